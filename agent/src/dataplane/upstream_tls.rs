//! DestinationRule `tls` origination (SIMPLE / MUTUAL): the rustls client configuration of a
//! cluster's upstream connections, as Envoy's `UpstreamTlsContext` that Istio generates:
//!
//! - the server certificate chains to `caCertificates` (or the `credentialName` Secret's CA),
//!   else to the system's CA bundle (Istio's default since `VERIFY_CERTIFICATE_AT_CLIENT`);
//!   `insecureSkipVerify: true` skips verification;
//! - with `subjectAltNames`, it must carry one of them (DNS/URI/email/IP, exact), else it must be
//!   valid for the SNI (`sni`, or the destination host);
//! - MUTUAL presents `clientCertificate`/`privateKey` or the Secret's `tls.crt`/`tls.key`.

use crate::compile::gateway::Credential;
use crate::compile::http::{UpstreamCa, UpstreamTls};
use crate::dataplane::gateway::{certificate_sans, san_matches};
use crate::dataplane::pool::TlsOrigination;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::sync::{Arc, OnceLock};

/// Builds the origination for `plan` to `host` (the SNI when the plan has none).
pub fn build(plan: &UpstreamTls, host: &str) -> TlsOrigination {
    TlsOrigination {
        plan: plan.clone(),
        connector: connector(plan, host),
    }
}

fn connector(
    plan: &UpstreamTls,
    host: &str,
) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), String> {
    if let Some(e) = &plan.error {
        return Err(e.clone());
    }
    let sni = plan.sni.as_deref().unwrap_or(host);
    let name = ServerName::try_from(sni.to_string())
        .map_err(|e| format!("SNI {sni:?} is not a valid server name: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = match &plan.ca {
        UpstreamCa::InsecureSkipVerify => Arc::new(SkipVerification(provider.clone())),
        ca => {
            let roots = match ca {
                UpstreamCa::System => system_roots()?,
                UpstreamCa::File(path) => {
                    let pem = std::fs::read(path)
                        .map_err(|e| format!("caCertificates {}: {e}", path.display()))?;
                    roots_from_pem(&pem, &format!("caCertificates {}", path.display()))?
                }
                UpstreamCa::Secret { name, pem } => {
                    roots_from_pem(&pem.0, &format!("secret {name}: ca.crt"))?
                }
                UpstreamCa::InsecureSkipVerify => unreachable!("handled above"),
            };
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| e.to_string())?;
            if plan.subject_alt_names.is_empty() {
                webpki
            } else {
                Arc::new(SanVerifier {
                    inner: webpki,
                    subject_alt_names: plan.subject_alt_names.clone(),
                })
            }
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &plan.client_certificate {
        None => builder.with_no_client_auth(),
        Some(credential) => {
            let (cert, key, what) = match credential {
                Credential::Secret { name, cert, key } => {
                    (cert.0.to_vec(), key.0.to_vec(), format!("secret {name}"))
                }
                Credential::Files { cert, key } => {
                    let read = |p: &std::path::Path| {
                        std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))
                    };
                    (read(cert)?, read(key)?, format!("{}", cert.display()))
                }
                Credential::Missing(reason) => return Err(reason.clone()),
                Credential::None => return Err("no client certificate".into()),
            };
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{what}: client certificate: {e}"))?;
            if chain.is_empty() {
                return Err(format!("{what}: no CERTIFICATE in the client certificate"));
            }
            let key = PrivateKeyDer::from_pem_slice(&key)
                .map_err(|e| format!("{what}: private key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{what}: {e}"))?
        }
    };
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
}

fn roots_from_pem(pem: &[u8], what: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("{what}: {e}"))?;
        roots.add(cert).map_err(|e| format!("{what}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{what}: no CERTIFICATE"));
    }
    Ok(roots)
}

/// The system CA bundle, loaded once (rustls-native-certs: `SSL_CERT_FILE`, else the
/// distribution's bundle).
fn system_roots() -> Result<rustls::RootCertStore, String> {
    static ROOTS: OnceLock<Result<rustls::RootCertStore, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let loaded = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(loaded.certs);
            if added == 0 {
                Err(format!(
                    "no system CA certificates found ({:?}); set caCertificates",
                    loaded.errors.first().map(|e| e.to_string())
                ))
            } else {
                Ok(roots)
            }
        })
        .clone()
}

/// The chain check of webpki, with `subjectAltNames` in place of the SNI name check.
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    subject_alt_names: Vec<String>,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let names = certificate_sans(end_entity);
        if san_matches(&self.subject_alt_names, &names) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate SANs {:?} match none of subjectAltNames {:?}",
                names.iter().map(|(_, n)| n).collect::<Vec<_>>(),
                self.subject_alt_names
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `insecureSkipVerify: true`: any certificate (handshake signatures are still checked).
#[derive(Debug)]
struct SkipVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for SkipVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
