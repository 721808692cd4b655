//! Conversion between the compiler's [`Plan`] and the kernel's map entries (pure).

use crate::compile::{Plan, ServicePlan, VipKey, alias, registry::Transport};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use steerd_common::{
    Addr, Backend, PROTO_TCP, PROTO_UDP, SVC_F_L7, SVC_F_NO_BACKENDS, ServiceKey, Slot,
};

/// What one service looks like in the kernel, minus the table id the writer assigns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelService {
    pub flags: u32,
    pub slots: Vec<Slot>,
}

pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_ipv4_be(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            Addr {
                words: [w(0), w(4), w(8), w(12)],
            }
        }
    }
}

pub fn ip_of(addr: &Addr) -> IpAddr {
    if addr.is_ipv4_mapped() {
        IpAddr::V4(Ipv4Addr::from(addr.ipv4_be().to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in addr.words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

pub fn service_key(vip: &VipKey) -> ServiceKey {
    ServiceKey {
        addr: addr_of(vip.ip),
        port: vip.port.to_be(),
        protocol: match vip.transport {
            Transport::Tcp => PROTO_TCP,
            Transport::Udp => PROTO_UDP,
        },
        _pad: 0,
    }
}

pub fn vip_of(key: &ServiceKey) -> Option<VipKey> {
    Some(VipKey {
        ip: ip_of(&key.addr),
        port: u16::from_be(key.port),
        transport: match key.protocol {
            PROTO_TCP => Transport::Tcp,
            PROTO_UDP => Transport::Udp,
            _ => return None,
        },
    })
}

pub fn backend_of(addr: SocketAddr) -> Backend {
    Backend {
        addr: addr_of(addr.ip()),
        port: addr.port().to_be(),
        _pad: 0,
    }
}

pub fn socket_of(b: &Backend) -> SocketAddr {
    SocketAddr::new(ip_of(&b.addr), u16::from_be(b.port))
}

/// The kernel entries for a plan.
pub fn tables(plan: &Plan) -> BTreeMap<ServiceKey, KernelService> {
    plan.services
        .iter()
        .map(|(vip, svc)| (service_key(vip), kernel_service(svc)))
        .collect()
}

/// The kernel entry of one service: its alias table and flags.
pub fn kernel_service(svc: &ServicePlan) -> KernelService {
    let weights: Vec<f64> = svc.backends.iter().map(|b| b.weight).collect();
    let columns = alias::build(&weights);
    let slots: Vec<Slot> = columns
        .iter()
        .map(|c| Slot {
            primary: backend_of(svc.backends[c.primary].addr),
            alias: backend_of(svc.backends[c.alias].addr),
            threshold: c.threshold,
            _pad: 0,
        })
        .collect();
    let mut flags = if slots.is_empty() {
        SVC_F_NO_BACKENDS
    } else {
        0
    };
    if svc.needs_l7 {
        flags |= SVC_F_L7;
    }
    KernelService { flags, slots }
}

/// The probability the kernel gives each backend of a table (inverse of [`tables`]).
pub fn backend_shares(slots: &[Slot]) -> Vec<(SocketAddr, f64)> {
    let mut backends: Vec<Backend> = Vec::new();
    let mut index = |b: &Backend| match backends.iter().position(|x| x == b) {
        Some(i) => i,
        None => {
            backends.push(*b);
            backends.len() - 1
        }
    };
    let columns: Vec<alias::Column> = slots
        .iter()
        .map(|s| alias::Column {
            primary: index(&s.primary),
            alias: index(&s.alias),
            threshold: s.threshold,
        })
        .collect();
    let p = alias::probabilities(&columns, backends.len());
    let mut out: Vec<(SocketAddr, f64)> = backends
        .iter()
        .map(socket_of)
        .zip(p)
        .filter(|(_, p)| *p > 0.0)
        .collect();
    out.sort_by_key(|a| a.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{ServicePlan, WeightedBackend};

    #[test]
    fn addresses_roundtrip_in_network_order() {
        for s in ["10.96.0.1", "fd00:96::1", "::ffff:10.0.0.1"] {
            let ip: IpAddr = s.parse().unwrap();
            let a = addr_of(ip);
            let back = ip_of(&a);
            // An IPv4-mapped IPv6 address is the IPv4 service.
            assert_eq!(back.to_canonical(), ip.to_canonical());
        }
        let a = addr_of("10.96.0.1".parse().unwrap());
        assert_eq!(a.words[3].to_ne_bytes(), [10, 96, 0, 1]);
        let k = service_key(&VipKey {
            ip: "10.96.0.1".parse().unwrap(),
            port: 9000,
            transport: Transport::Tcp,
        });
        assert_eq!(k.port.to_ne_bytes(), 9000u16.to_be_bytes());
        assert_eq!(vip_of(&k).unwrap().port, 9000);
    }

    #[test]
    fn tables_reproduce_plan_weights() {
        let mut plan = Plan::default();
        let vip = VipKey {
            ip: "10.96.0.1".parse().unwrap(),
            port: 80,
            transport: Transport::Tcp,
        };
        let b = |a: &str, w: f64| WeightedBackend {
            addr: a.parse().unwrap(),
            weight: w,
            clusters: std::sync::Arc::from([]),
            workload: Default::default(),
            locality: String::new(),
        };
        plan.services.insert(
            vip,
            std::sync::Arc::new(ServicePlan {
                host: "h".into(),
                port_name: "p".into(),
                route: "default".into(),
                backends: vec![b("10.0.0.1:80", 0.8), b("10.0.0.2:80", 0.2)],
                needs_l7: false,
                http: None,
            }),
        );
        let t = tables(&plan);
        let svc = &t[&service_key(&vip)];
        assert_eq!(svc.flags, 0);
        let shares = backend_shares(&svc.slots);
        assert_eq!(shares.len(), 2);
        assert!(
            (shares[0].1 - 0.8).abs() < 1e-6 && (shares[1].1 - 0.2).abs() < 1e-6,
            "{shares:?}"
        );
        std::sync::Arc::make_mut(plan.services.get_mut(&vip).unwrap())
            .backends
            .clear();
        assert_eq!(tables(&plan)[&service_key(&vip)].flags, SVC_F_NO_BACKENDS);
    }
}
