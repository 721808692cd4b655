//! `--source kube` end to end: a real kube-apiserver (v1.20, `shared/k8s/test-apiserver`) with
//! the Istio CRDs and the tcp-echo sample, the agent watching it from a node netns, pinned maps
//! and steered connections from a test cgroup to identity servers in pod netns.
//!
//! Nothing runs in that API server (no kubelet or controllers), so the tests create the Pods,
//! their status and the EndpointSlices themselves, with Pod IPs that are the harness's pod netns.
//! The agent runs with the ServiceAccount and ClusterRole of `deploy/` (a TokenRequest token),
//! so the RBAC the DaemonSet gets is what these tests exercise.
//!
//! The API server listens on the root netns's loopback; the agent lives in the node netns and
//! reaches it through a loopback-to-loopback forwarder ([`Forwarder`]). Every VIP is dialled
//! from the node netns, which has no default route: unsteered traffic dies there.

use std::cell::RefCell;
use std::io::{ErrorKind, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use steerd_e2e::{
    Agent, BpffsDir, Netns, Node, Pod, ProbeResult, TcpIdentityServer, TempDir, TestCgroup,
    admin_addr, assert_split, http_get_status, run_probe, wait_until,
};

const SPLIT_CONNECTS: u64 = 2_000;
const SIGMAS: f64 = 4.0;
/// How long the agent may take to reflect an API change in the maps (debounce + reconcile).
const FOLLOW: Duration = Duration::from_secs(15);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

fn shared(path: &str) -> PathBuf {
    workspace().join("../shared").join(path)
}

fn sample(path: &str) -> String {
    let p = shared("istio/samples").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

// ---------------------------------------------------------------------------------------------
// The API server

/// `test-apiserver start DIR` in a fresh directory; `stop DIR` on drop (also when a test
/// panics, in which case the end of its log is printed).
struct ApiServer {
    dir: TempDir,
    kubeconfig: PathBuf,
    /// Every etcd and kube-apiserver started here, as (pid, start time), to make sure they are
    /// gone after `stop` (see [`ApiServer::reap`]).
    started: RefCell<Vec<(i32, u64)>>,
}

impl ApiServer {
    fn start() -> ApiServer {
        let dir = TempDir::new("steerd-kube-apiserver");
        let kubeconfig = start_apiserver(dir.path(), &[]);
        let api = ApiServer {
            dir,
            kubeconfig,
            started: RefCell::default(),
        };
        api.record_started();
        // Until this answers, the default namespace and the RBAC bootstrap may be missing.
        let ok = wait_until(Duration::from_secs(30), || {
            api.try_kubectl(&["get", "namespace", "default"], None)
                .is_ok()
        });
        assert!(ok, "the API server never served the default namespace");
        api
    }

    fn script() -> PathBuf {
        shared("k8s/test-apiserver")
    }

    /// `kubectl args...` with the admin kubeconfig and `stdin` as input.
    fn try_kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning kubectl: {e}"));
        let mut input = child.stdin.take().expect("piped stdin");
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .expect("writing kubectl's stdin");
        drop(input);
        let out = child.wait_with_output().expect("waiting for kubectl");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.try_kubectl(args, None)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `kubectl apply --validate=false -f -`: the Istio CRDs' client-side schemas are more than
    /// kubectl 1.20's validation understands.
    fn apply(&self, yaml: &str) -> String {
        self.try_kubectl(&["apply", "--validate=false", "-f", "-"], Some(yaml))
            .unwrap_or_else(|e| panic!("{e}\n--- input ---\n{yaml}"))
    }

    /// A raw API request (for what kubectl 1.20 cannot do: status subresources, TokenRequests)
    /// with the admin token, re-read every time because a restart issues a new one.
    fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> serde_json::Value {
        let config = std::fs::read_to_string(&self.kubeconfig).expect("reading the kubeconfig");
        let field = |key: &str| {
            config
                .lines()
                .find_map(|l| l.trim().strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {config}"))
                .trim()
                .to_string()
        };
        let (server, token) = (field("server:"), field("token:"));
        let ca = self.dir.path().join("pki/ca.crt");
        let mut child = Command::new("curl")
            .args(["-sS", "--fail-with-body", "--max-time", "10", "-X", method])
            .arg("--cacert")
            .arg(&ca)
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["-H", &format!("Content-Type: {content_type}")])
            .args(["--data-binary", "@-", &format!("{server}{path}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning curl");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(body.as_bytes())
            .expect("writing curl's stdin");
        let out = child.wait_with_output().expect("waiting for curl");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{method} {path}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{method} {path}: {e}: {stdout}"))
    }

    /// `https://127.0.0.1:PORT` of the API server.
    fn server(&self) -> String {
        let config = std::fs::read_to_string(&self.kubeconfig).expect("reading the kubeconfig");
        config
            .lines()
            .find_map(|l| l.trim().strip_prefix("server:"))
            .expect("server in kubeconfig")
            .trim()
            .to_string()
    }

    fn port(&self) -> u16 {
        self.server()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port in server URL")
    }

    /// Stops etcd and the API server (their data stays in DIR), and checks that the port is
    /// closed: a restart test must not talk to a server that never went away.
    fn stop(&self) -> RestartPorts {
        let ports = RestartPorts {
            apiserver: self.port(),
            etcd: etcd_port(self.dir.path(), "--listen-client-urls"),
            etcd_peer: etcd_port(self.dir.path(), "--listen-peer-urls"),
        };
        stop_apiserver(self.dir.path());
        self.reap();
        let closed = wait_until(Duration::from_secs(10), || {
            TcpStream::connect((Ipv4Addr::LOCALHOST, ports.apiserver)).is_err()
        });
        assert!(closed, "port {} still open after stop", ports.apiserver);
        ports
    }

    /// Starts them again on the same ports, so clients' URLs stay valid.
    fn start_again(&self, ports: RestartPorts) {
        start_apiserver(
            self.dir.path(),
            &[
                ("STEERD_K8S_APISERVER_PORT", ports.apiserver),
                ("STEERD_K8S_ETCD_PORT", ports.etcd),
                ("STEERD_K8S_ETCD_PEER_PORT", ports.etcd_peer),
            ],
        );
        self.record_started();
    }

    /// Remembers the processes the last start left in the pid files.
    fn record_started(&self) {
        for file in ["etcd.pid", "apiserver.pid"] {
            let pid = std::fs::read_to_string(self.dir.path().join(file))
                .ok()
                .and_then(|p| p.trim().parse().ok());
            if let Some(pid) = pid
                && let Some(start) = start_time(pid)
            {
                self.started.borrow_mut().push((pid, start));
            }
        }
    }

    /// SIGKILLs whatever `test-apiserver stop` left of the processes started here (it goes by
    /// the pid files, and has been seen to miss a kube-apiserver), then waits for them to go.
    /// The start time guards against a reused pid.
    fn reap(&self) {
        for &(pid, start) in self.started.borrow().iter() {
            if start_time(pid) != Some(start) {
                continue;
            }
            eprintln!("kube test: pid {pid} outlived `test-apiserver stop`; killing it");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let gone = wait_until(Duration::from_secs(10), || start_time(pid) != Some(start));
            assert!(
                gone || std::thread::panicking(),
                "pid {pid} survived SIGKILL"
            );
        }
    }

    /// The Istio CRDs, established.
    fn install_istio_crds(&self) {
        let crds = shared("istio/crds/crd-all.gen.yaml");
        self.kubectl(&["apply", "--validate=false", "-f", crds.to_str().unwrap()]);
        // kubectl 1.20's `wait` fails, instead of waiting, on a CRD the API server has not
        // given status conditions yet (right after creation): ask again until all are there.
        let mut last = String::new();
        let established = wait_until(Duration::from_secs(60), || {
            let wait = [
                "wait",
                "--for",
                "condition=established",
                "--timeout=60s",
                "crd",
                "--all",
            ];
            match self.try_kubectl(&wait, None) {
                Ok(_) => true,
                Err(e) => {
                    last = e;
                    false
                }
            }
        });
        assert!(established, "the Istio CRDs were not established: {last}");
    }

    /// `deploy/` applied for real (nothing runs it: this API server has no controllers), and a
    /// kubeconfig for its ServiceAccount, whose token survives API server restarts (it is signed
    /// with the service-account key, which stays in DIR; the admin token does not).
    fn steerd_kubeconfig(&self) -> PathBuf {
        let deploy = workspace().join("deploy");
        self.kubectl(&["apply", "-k", deploy.to_str().unwrap()]);
        let request = r#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"expirationSeconds":7200}}"#;
        let response = self.request(
            "POST",
            "/api/v1/namespaces/steerd-system/serviceaccounts/steerd/token",
            "application/json",
            request,
        );
        let token = response["status"]["token"]
            .as_str()
            .unwrap_or_else(|| panic!("no token in {response}"));
        let path = self.dir.path().join("steerd.kubeconfig");
        let ca = self.dir.path().join("pki/ca.crt");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: steerd\n  user:\n    token: {token}\ncontexts:\n- name: steerd\n  context: {{cluster: test, user: steerd}}\ncurrent-context: steerd\n",
                self.server(),
                ca.display()
            ),
        )
        .expect("writing the steerd kubeconfig");
        path
    }

    /// Sets a Pod's status as a kubelet would (kubectl 1.20 has no `--subresource`).
    fn set_pod_status(&self, name: &str, ip: Ipv4Addr) {
        let patch = serde_json::json!({"status": {
            "phase": "Running",
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }});
        self.request(
            "PATCH",
            &format!("/api/v1/namespaces/default/pods/{name}/status"),
            "application/merge-patch+json",
            &patch.to_string(),
        );
    }

    /// The EndpointSlice API version the server serves (v1 from Kubernetes 1.21 on).
    fn endpoint_slice_version(&self) -> &'static str {
        let versions = self.kubectl(&["api-versions"]);
        if versions.lines().any(|l| l == "discovery.k8s.io/v1") {
            "discovery.k8s.io/v1"
        } else {
            "discovery.k8s.io/v1beta1"
        }
    }

    /// `reason=InvalidConfig` Events about `name` in `default`, as "reason type message".
    fn invalid_config_events(&self, name: &str) -> Vec<String> {
        let events: serde_json::Value =
            serde_json::from_str(&self.kubectl(&["get", "events", "-n", "default", "-o", "json"]))
                .expect("events JSON");
        events["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["reason"] == "InvalidConfig" && e["involvedObject"]["name"] == name)
            .map(|e| format!("{} {} {}", e["reason"], e["type"], e["message"]))
            .collect()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default();
            let tail: Vec<_> = log.lines().rev().take(20).collect();
            eprintln!(
                "--- kube-apiserver log (last lines) ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        stop_apiserver(self.dir.path());
        self.reap();
    }
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot); `None` once the process
/// has exited (zombies included: nothing may reap them in a sandbox whose init does not).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces; the state (field 3)
    // follows it, and field 22 is the 20th field after it.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

#[derive(Debug, Clone, Copy)]
struct RestartPorts {
    apiserver: u16,
    etcd: u16,
    etcd_peer: u16,
}

/// Runs `test-apiserver start DIR` and returns the kubeconfig it announces. Tried three times:
/// the script picks free ports at random, and tests starting in parallel can pick the same one.
fn start_apiserver(dir: &Path, env: &[(&str, u16)]) -> PathBuf {
    let mut failures = Vec::new();
    for _ in 0..3 {
        let mut cmd = Command::new(ApiServer::script());
        cmd.arg("start").arg(dir);
        for (key, value) in env {
            cmd.env(key, value.to_string());
        }
        let out = cmd.output().expect("running test-apiserver start");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            return stdout
                .lines()
                .find_map(|l| l.strip_prefix("export KUBECONFIG="))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("no KUBECONFIG line in {stdout:?}"));
        }
        let failure = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        eprintln!("test-apiserver start {} failed: {failure}", dir.display());
        failures.push(failure);
    }
    panic!(
        "test-apiserver start {} failed 3 times (is it installed? `test-apiserver install`): {failures:#?}",
        dir.display()
    );
}

fn stop_apiserver(dir: &Path) {
    let out = Command::new(ApiServer::script())
        .arg("stop")
        .arg(dir)
        .output();
    if !out.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("test-apiserver stop {}: {out:?}", dir.display());
    }
}

/// The port in etcd's `flag http://127.0.0.1:PORT` argument, from its command line.
fn etcd_port(dir: &Path, flag: &str) -> u16 {
    let pid = std::fs::read_to_string(dir.join("etcd.pid")).expect("etcd.pid");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).expect("etcd cmdline");
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .and_then(|url| url.rsplit(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {flag} in etcd's command line {args:?}"))
}

// ---------------------------------------------------------------------------------------------
// Reaching the API server from the node netns

/// Listens on 127.0.0.1:`port` inside a netns and pipes every connection to 127.0.0.1:`port` of
/// the root netns (where the API server is). Loopback to loopback: nothing leaves the machine.
struct Forwarder {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    fn start(netns: &Netns, port: u16) -> Forwarder {
        let listener = netns
            .run_in(|| TcpListener::bind((Ipv4Addr::LOCALHOST, port)))
            .unwrap_or_else(|e| panic!("binding 127.0.0.1:{port} in {}: {e}", netns.name()));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let thread = {
            let (stop, conns) = (stop.clone(), conns.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let client = match listener.accept() {
                        Ok((c, _)) => c,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                        Err(_) => continue,
                    };
                    let _ = client.set_nonblocking(false);
                    // This thread never entered the netns: it connects in the root netns.
                    let Ok(upstream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
                        continue; // The API server is down: the client sees the connection close.
                    };
                    let mut held = conns.lock().unwrap();
                    held.retain(|s: &TcpStream| s.peer_addr().is_ok());
                    for s in [&client, &upstream] {
                        if let Ok(s) = s.try_clone() {
                            held.push(s);
                        }
                    }
                    pipe(client.try_clone().unwrap(), upstream.try_clone().unwrap());
                    pipe(upstream, client);
                }
            })
        };
        Forwarder {
            stop,
            conns,
            thread: Some(thread),
        }
    }
}

/// Copies `from` → `to` on a thread; when either side ends, both are shut down so the thread of
/// the other direction ends too.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The tcp-echo cluster

/// The sample's 80/20 route bound to the mesh (the shipped one is bound to an ingress gateway).
fn mesh_route(w1: &str, w2: &str) -> String {
    sample("tcp-echo/tcp-echo-20-v2.yaml")
        .replace("name: tcp-echo\n", "name: tcp-echo-mesh\n")
        .replace(
            "  - \"*\"\n  gateways:\n  - tcp-echo-gateway",
            "  - tcp-echo\n  gateways:\n  - mesh",
        )
        .replace("port: 31400", "port: 9000")
        .replace("weight: 80", &format!("weight: {w1}"))
        .replace("weight: 20", &format!("weight: {w2}"))
}

fn pod_manifest(name: &str, version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: tcp-echo, version: {version}}}\nspec:\n  nodeName: steerd-test-node\n  containers:\n  - name: tcp-echo\n    image: tcp-echo-server:1.3\n    ports: [{{containerPort: 9000}}, {{containerPort: 9001}}]\n"
    )
}

/// The tcp-echo EndpointSlice the EndpointSlice controller would write, for `pods`.
fn endpoint_slice(api_version: &str, pods: &[(&str, &Pod)]) -> String {
    let endpoints: String = pods
        .iter()
        .map(|(name, pod)| {
            format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {name}, namespace: default}}\n",
                pod.ipv4
            )
        })
        .collect();
    format!(
        "apiVersion: {api_version}\nkind: EndpointSlice\nmetadata:\n  name: tcp-echo-x7k2p\n  namespace: default\n  labels: {{kubernetes.io/service-name: tcp-echo}}\naddressType: IPv4\nports:\n- {{name: tcp, port: 9000, protocol: TCP}}\n- {{name: tcp-other, port: 9001, protocol: TCP}}\nendpoints:\n{endpoints}"
    )
}

/// An API server holding the tcp-echo sample whose Pods are the pod netns of a node, an agent
/// watching it, and a cgroup whose connections are steered.
struct Cluster {
    // Field order is drop order: the agent goes before the pins, netns and cgroup it uses, and
    // the API server last.
    agent: Agent,
    _forwarder: Forwarder,
    _files: TempDir,
    client: TestCgroup,
    bpffs: BpffsDir,
    _servers: Vec<TcpIdentityServer>,
    v1: Pod,
    v2: Pod,
    node: Node,
    vip: String,
    slice_version: &'static str,
    api: ApiServer,
}

impl Cluster {
    /// `before_agent` runs once the API server is set up, before the agent starts; `files` go
    /// into a directory that is a second source of the same agent.
    fn start(
        route: (&str, &str),
        extra_files: &[(&str, &str)],
        before_agent: impl FnOnce(&ApiServer),
    ) -> Cluster {
        let api = ApiServer::start();
        api.install_istio_crds();
        let kubeconfig = api.steerd_kubeconfig();

        let node = Node::new();
        let v1 = node.add_pod("tcp-echo-v1");
        let v2 = node.add_pod("tcp-echo-v2");
        let mut servers = Vec::new();
        for (pod, id) in [(&v1, "v1"), (&v2, "v2")] {
            for port in [9000, 9001] {
                servers.push(TcpIdentityServer::start(
                    pod,
                    pod.sock_v4(port),
                    &format!("{id}:{port}"),
                ));
            }
        }

        // The sample as shipped (its Deployments are stored and never run), then what the
        // kubelet and the EndpointSlice controller would add.
        api.apply(&sample("tcp-echo/tcp-echo-services.yaml"));
        api.apply(&sample("tcp-echo/tcp-echo-all-v1.yaml"));
        api.apply(&format!(
            "{}---\n{}",
            pod_manifest("tcp-echo-v1-a", "v1"),
            pod_manifest("tcp-echo-v2-a", "v2")
        ));
        api.set_pod_status("tcp-echo-v1-a", v1.ipv4);
        api.set_pod_status("tcp-echo-v2-a", v2.ipv4);
        let slice_version = api.endpoint_slice_version();
        api.apply(&endpoint_slice(
            slice_version,
            &[("tcp-echo-v1-a", &v1), ("tcp-echo-v2-a", &v2)],
        ));
        api.apply(&mesh_route(route.0, route.1));
        let vip = api.kubectl(&[
            "get",
            "service",
            "tcp-echo",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ]);
        assert!(vip.starts_with("10."), "unexpected cluster IP {vip:?}");
        before_agent(&api);

        let forwarder = Forwarder::start(&node.netns, api.port());
        let client = TestCgroup::new();
        let bpffs = BpffsDir::new();
        let files = TempDir::new("steerd-kube-files");
        for (name, text) in extra_files {
            files.write(name, text);
        }
        let admin = admin_addr().to_string();
        let files_source = format!("files:{}", files.as_str());
        let mut agent = Agent::spawn(
            &node,
            &[
                "run",
                "--source",
                "kube",
                "--source",
                &files_source,
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--bpffs",
                bpffs.as_str(),
                "--cgroup",
                client.path().to_str().unwrap(),
                "--admin",
                &admin,
            ],
        );
        agent.wait_ready(admin_addr(), Duration::from_secs(60));
        Cluster {
            agent,
            _forwarder: forwarder,
            _files: files,
            client,
            bpffs,
            _servers: servers,
            v1,
            v2,
            node,
            vip,
            slice_version,
            api,
        }
    }

    fn tcp(&self, to: &str, count: u64) -> ProbeResult {
        let count = count.to_string();
        run_probe(
            Some(&self.node.netns),
            Some(&self.client),
            &["tcp", "--to", to, "--count", &count],
        )
    }

    fn to(&self, port: u16) -> String {
        format!("{}:{port}", self.vip)
    }

    fn maps_backends(&self) -> serde_json::Value {
        Agent::run_cli_json(
            &self.node,
            &[
                "maps",
                "backends",
                "-o",
                "json",
                "--bpffs",
                self.bpffs.as_str(),
            ],
        )
    }

    /// `vip:port`'s backends and their shares in the kernel, e.g. `[("10.244.1.2:9000", 80.0)]`.
    fn backends(&self, vip: &str, port: u16) -> Vec<(String, f64)> {
        let mut rows: Vec<(String, f64)> = self
            .maps_backends()
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["vip"] == vip && r["port"] == port)
            .map(|r| {
                (
                    r["backend"].as_str().unwrap().to_string(),
                    r["weight"].as_f64().unwrap(),
                )
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    }

    /// Waits until the kernel's backends of `vip:port` are exactly `expected` (shares in %).
    fn wait_for_backends(&self, vip: &str, port: u16, expected: &[(String, f64)]) {
        let matches = |rows: &[(String, f64)]| {
            rows.len() == expected.len()
                && rows
                    .iter()
                    .zip(expected)
                    .all(|((b, w), (eb, ew))| b == eb && (w - ew).abs() < 0.01)
        };
        let ok = wait_until(FOLLOW, || matches(&self.backends(vip, port)));
        assert!(
            ok,
            "{vip}:{port} never had backends {expected:?}; now {:?}\nagent log:\n{}",
            self.backends(vip, port),
            self.agent.log()
        );
    }

    fn v1_at(&self, port: u16, share: f64) -> (String, f64) {
        (format!("{}:{port}", self.v1.ipv4), share)
    }

    fn v2_at(&self, port: u16, share: f64) -> (String, f64) {
        (format!("{}:{port}", self.v2.ipv4), share)
    }

    fn assert_agent_alive(&mut self) {
        assert!(
            self.agent.try_wait().is_none(),
            "the agent exited:\n{}",
            self.agent.log()
        );
    }
}

fn assert_clean(r: &ProbeResult, what: &str) {
    assert_eq!(r.failures, 0, "{what}: failures: {r:?}");
    assert_eq!(
        r.peer_mismatches, 0,
        "{what}: getpeername showed a backend, not the VIP: {r:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests

/// A Service that only the files source defines, whose endpoints are Pods from the API server:
/// the two sources of one agent are merged before compiling.
const FILES_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo-files, namespace: default}\nspec:\n  clusterIP: 10.255.0.10\n  selector: {app: tcp-echo, version: v2}\n  ports: [{name: tcp, port: 7000, targetPort: 9001}]\n";

#[test]
fn maps_follow_the_api_server_and_connections_are_steered() {
    let mut c = Cluster::start(("80", "20"), &[("echo-files.yaml", FILES_SERVICE)], |_| {});

    // Created: the mesh route's 80/20 split over the DestinationRule's subsets.
    c.wait_for_backends(
        &c.vip.clone(),
        9000,
        &[c.v1_at(9000, 80.0), c.v2_at(9000, 20.0)],
    );
    let r = c.tcp(&c.to(9000), SPLIT_CONNECTS);
    assert_clean(&r, "80/20");
    assert_split(&r.counts, &[("v1:9000", 0.8), ("v2:9000", 0.2)], SIGMAS);
    // The route matches port 9000 only.
    let r = c.tcp(&c.to(9001), 1_000);
    assert_clean(&r, "9001");
    assert_split(&r.counts, &[("v1:9001", 0.5), ("v2:9001", 0.5)], SIGMAS);

    // The files source's Service, backed by the API server's Pods.
    c.wait_for_backends("10.255.0.10", 7000, &[c.v2_at(9001, 100.0)]);
    let r = c.tcp("10.255.0.10:7000", 200);
    assert_clean(&r, "files + kube");
    assert_split(&r.counts, &[("v2:9001", 1.0)], SIGMAS);

    // Updated: a new weight on the VirtualService.
    c.api.apply(&mesh_route("25", "75"));
    c.wait_for_backends(
        &c.vip.clone(),
        9000,
        &[c.v1_at(9000, 25.0), c.v2_at(9000, 75.0)],
    );
    let r = c.tcp(&c.to(9000), SPLIT_CONNECTS);
    assert_clean(&r, "25/75");
    assert_split(&r.counts, &[("v1:9000", 0.25), ("v2:9000", 0.75)], SIGMAS);

    // Deleted: without the route, both endpoints share the VIP evenly.
    c.api
        .kubectl(&["delete", "virtualservice", "tcp-echo-mesh"]);
    c.wait_for_backends(
        &c.vip.clone(),
        9000,
        &[c.v1_at(9000, 50.0), c.v2_at(9000, 50.0)],
    );

    // Endpoints follow the EndpointSlice.
    c.api.apply(&endpoint_slice(
        c.slice_version,
        &[("tcp-echo-v1-a", &c.v1)],
    ));
    c.wait_for_backends(&c.vip.clone(), 9000, &[c.v1_at(9000, 100.0)]);
    let r = c.tcp(&c.to(9000), 300);
    assert_clean(&r, "v1 only");
    assert_split(&r.counts, &[("v1:9000", 1.0)], SIGMAS);

    // The Service deleted: its VIP is no longer steered and dies in the node.
    c.api.kubectl(&["delete", "service", "tcp-echo"]);
    c.wait_for_backends(&c.vip.clone(), 9000, &[]);
    let r = run_probe(
        Some(&c.node.netns),
        Some(&c.client),
        &[
            "tcp",
            "--to",
            &c.to(9000),
            "--count",
            "3",
            "--timeout-ms",
            "300",
        ],
    );
    assert_eq!(
        r.failures, 3,
        "a deleted Service must not be steered: {r:?}"
    );
    c.assert_agent_alive();
}

#[test]
fn api_server_restart_keeps_the_plan_and_later_changes_are_picked_up() {
    let mut c = Cluster::start(("100", "0"), &[], |_| {});
    let vip = c.vip.clone();
    c.wait_for_backends(&vip, 9000, &[c.v1_at(9000, 100.0)]);

    let ports = c.api.stop();
    // Long enough for several failed watch attempts and backoffs.
    let failing = wait_until(Duration::from_secs(20), || {
        c.agent.log().contains("watch failed")
    });
    assert!(
        failing,
        "the agent never noticed the API server was gone:\n{}",
        c.agent.log()
    );
    std::thread::sleep(Duration::from_secs(3));
    c.assert_agent_alive();
    assert_eq!(
        c.backends(&vip, 9000),
        [c.v1_at(9000, 100.0)],
        "the plan must survive the outage"
    );
    let r = c.tcp(&c.to(9000), 300);
    assert_clean(&r, "API server down");
    assert_split(&r.counts, &[("v1:9000", 1.0)], SIGMAS);
    assert_eq!(
        http_get_status(&c.node.netns.path(), admin_addr(), "/readyz").unwrap(),
        200,
        "still ready: the maps hold a plan"
    );

    c.api.start_again(ports);
    c.api.apply(&mesh_route("0", "100"));
    // The watchers back off up to 30 s between attempts (kube-runtime's default).
    let ok = wait_until(Duration::from_secs(60), || {
        c.backends(&vip, 9000) == [c.v2_at(9000, 100.0)]
    });
    assert!(
        ok,
        "a change after the restart never arrived: {:?}\n{}",
        c.backends(&vip, 9000),
        c.agent.log()
    );
    let r = c.tcp(&c.to(9000), 300);
    assert_clean(&r, "after restart");
    assert_split(&r.counts, &[("v2:9000", 1.0)], SIGMAS);
    c.assert_agent_alive();
}

/// Makes the VirtualService CRD accept any `spec`, as Istio's CRDs did before they carried full
/// schemas: then istiod's validating webhook was the only check, and steerd runs without istiod.
/// (With today's schemas the API server itself rejects `weight: "heavy"`.)
fn accept_any_virtual_service_spec(api: &ApiServer) {
    let crd = "virtualservices.networking.istio.io";
    let versions = api.kubectl(&["get", "crd", crd, "-o", "jsonpath={.spec.versions[*].name}"]);
    let patch: Vec<serde_json::Value> = (0..versions.split_whitespace().count())
        .map(|i| {
            serde_json::json!({
                "op": "replace",
                "path": format!("/spec/versions/{i}/schema/openAPIV3Schema/properties/spec"),
                "value": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            })
        })
        .collect();
    api.kubectl(&[
        "patch",
        "crd",
        crd,
        "--type=json",
        "-p",
        &serde_json::Value::from(patch).to_string(),
    ]);
}

#[test]
fn invalid_objects_are_skipped_with_an_event_and_the_rest_keeps_working() {
    let mut c = Cluster::start(("80", "20"), &[], accept_any_virtual_service_spec);
    let vip = c.vip.clone();
    let split = [c.v1_at(9000, 80.0), c.v2_at(9000, 20.0)];
    c.wait_for_backends(&vip, 9000, &split);

    // A new object that does not parse: skipped, logged with kind, object, field; an Event.
    let bad = mesh_route("heavy", "1").replace("name: tcp-echo-mesh\n", "name: tcp-echo-bad\n");
    let created = wait_until(Duration::from_secs(10), || {
        c.api
            .try_kubectl(&["apply", "--validate=false", "-f", "-"], Some(&bad))
            .is_ok()
    });
    assert!(created, "the relaxed CRD never accepted the invalid object");
    let field = "VirtualService default/tcp-echo-bad: spec.tcp[0].route[0].weight";
    let logged = wait_until(FOLLOW, || c.agent.log().contains(field));
    assert!(logged, "no log line naming {field}:\n{}", c.agent.log());
    let evented = wait_until(FOLLOW, || {
        !c.api.invalid_config_events("tcp-echo-bad").is_empty()
    });
    assert!(
        evented,
        "no InvalidConfig Event: {}",
        c.api.kubectl(&["get", "events", "-A"])
    );
    let events = c.api.invalid_config_events("tcp-echo-bad");
    assert!(
        events[0].contains("Warning") && events[0].contains("spec.tcp[0].route[0].weight"),
        "{events:?}"
    );

    // The valid route keeps steering.
    assert_eq!(c.backends(&vip, 9000), split);
    let r = c.tcp(&c.to(9000), SPLIT_CONNECTS);
    assert_clean(&r, "next to an invalid object");
    assert_split(&r.counts, &[("v1:9000", 0.8), ("v2:9000", 0.2)], SIGMAS);

    // A broken update of the valid route: its last good version keeps serving.
    c.api.apply(&mesh_route("all", "20"));
    let evented = wait_until(FOLLOW, || {
        !c.api.invalid_config_events("tcp-echo-mesh").is_empty()
    });
    assert!(
        evented,
        "no InvalidConfig Event for the broken update:\n{}",
        c.agent.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        c.backends(&vip, 9000),
        split,
        "the last good version keeps serving"
    );

    // Fixed: followed again.
    c.api.apply(&mesh_route("0", "100"));
    c.wait_for_backends(&vip, 9000, &[c.v2_at(9000, 100.0)]);
    let r = c.tcp(&c.to(9000), 300);
    assert_clean(&r, "fixed");
    assert_split(&r.counts, &[("v2:9000", 1.0)], SIGMAS);
    c.assert_agent_alive();
}

#[test]
fn authorization_policies_from_the_api_server_are_enforced() {
    let c = Cluster::start(("80", "20"), &[], |_| {});
    // From inside the v2 pod straight to the v1 pod: the SYN reaches v1 through its veth.
    let v1 = format!("{}:9000", c.v1.ipv4);
    let from_v2 = |count: &str| {
        run_probe(
            Some(&c.v2.netns),
            None,
            &["tcp", "--to", &v1, "--count", count, "--timeout-ms", "3000"],
        )
    };
    assert_eq!(from_v2("3").counts.get("v1:9000"), Some(&3));
    let policy = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: no-v2, namespace: default}}\nspec:\n  selector: {{matchLabels: {{version: v1}}}}\n  action: DENY\n  rules:\n  - from:\n    - source: {{ipBlocks: [{}/32]}}\n",
        c.v2.ipv4
    );
    c.api.apply(&policy);
    let refused = wait_until(FOLLOW, || from_v2("1").failures == 1);
    assert!(refused, "the policy never took effect:\n{}", c.agent.log());
    let r = from_v2("3");
    assert!(
        r.failures == 3 && r.errors.iter().all(|e| e.contains("Connection refused")),
        "{r:?}"
    );
    c.api
        .kubectl(&["delete", "authorizationpolicy", "no-v2", "-n", "default"]);
    let restored = wait_until(FOLLOW, || from_v2("1").successes() == 1);
    assert!(
        restored,
        "deleting the policy did not restore access:\n{}",
        c.agent.log()
    );
}

/// The objects (`kind/name`) a dry run reports.
fn dry_run_objects(api: &ApiServer, args: &[&str]) -> Vec<String> {
    let mut full = vec!["apply", "--dry-run=server"];
    full.extend_from_slice(args);
    let out = api.kubectl(&full);
    let mut objects: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    objects.sort();
    objects
}

#[test]
fn deploy_manifests_pass_a_server_side_dry_run() {
    let api = ApiServer::start();
    api.install_istio_crds();
    // A server dry run creates nothing, so the namespaced objects need their namespace to exist.
    api.kubectl(&["create", "namespace", "steerd-system"]);
    let deploy = workspace().join("deploy");
    let kustomized = dry_run_objects(&api, &["-k", deploy.to_str().unwrap()]);
    let rendered = dry_run_objects(&api, &["-f", deploy.join("steerd.yaml").to_str().unwrap()]);
    assert_eq!(
        kustomized, rendered,
        "deploy/steerd.yaml is not the rendered kustomization"
    );
    for expected in [
        "namespace/steerd-system",
        "serviceaccount/steerd",
        "clusterrole.rbac.authorization.k8s.io/steerd",
        "clusterrolebinding.rbac.authorization.k8s.io/steerd",
        "clusterrole.rbac.authorization.k8s.io/steerd-gateway-secrets",
        "daemonset.apps/steerd",
    ] {
        assert!(
            kustomized.iter().any(|o| o == expected),
            "{expected} missing from {kustomized:?}"
        );
    }
    let uninstall = dry_run_objects(
        &api,
        &["-f", deploy.join("uninstall-job.yaml").to_str().unwrap()],
    );
    assert_eq!(uninstall, ["daemonset.apps/steerd-cleanup"]);
    // The per-gateway-namespace grant of Secrets, for its example namespace.
    api.kubectl(&["create", "namespace", "istio-system"]);
    let binding = dry_run_objects(
        &api,
        &[
            "-f",
            deploy
                .join("gateway-secrets-rolebinding.yaml")
                .to_str()
                .unwrap(),
        ],
    );
    assert_eq!(
        binding,
        ["rolebinding.rbac.authorization.k8s.io/steerd-gateway-secrets"]
    );
}

// ---------------------------------------------------------------------------------------------
// Gateway credentials from the API server

#[path = "support/tls.rs"]
mod tls;

/// `steerd run --gateway default/edge` with the kube source: the Gateway, its VirtualService and
/// the `credentialName` Secret come from the API server (created with kubectl), the backend
/// Service and Pod from a files source. The agent reads Secrets with the ServiceAccount of
/// `deploy/` plus the documented per-namespace RoleBinding.
#[test]
fn gateway_certificates_come_from_secrets_and_rotate_without_rebinding() {
    use base64::Engine;
    const NODE_IP: &str = "10.250.0.1";
    let api = ApiServer::start();
    api.install_istio_crds();
    let kubeconfig = api.steerd_kubeconfig();
    api.kubectl(&[
        "-n",
        "default",
        "create",
        "rolebinding",
        "steerd-gateway-secrets",
        "--clusterrole=steerd-gateway-secrets",
        "--serviceaccount=steerd-system:steerd",
    ]);

    let ca = tls::Ca::new();
    let first = ca.leaf("a.example.com");
    api.apply(&tls::tls_secret("a-cert", &first));
    api.apply(
        r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [a.example.com]
    tls: {mode: SIMPLE, credentialName: a-cert}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a, namespace: default}
spec:
  hosts: [a.example.com]
  gateways: [edge]
  http:
  - route: [{destination: {host: web}}]
"#,
    );

    let node = Node::new();
    node.netns
        .ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]);
    let client = node.add_pod("client");
    let web = node.add_pod("web");
    let _server = steerd_e2e::HttpIdentityServer::start(&web, web.sock_v4(8080), "web");
    let files = TempDir::new("steerd-kube-gw-files");
    files.write(
        "web.yaml",
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: 10.255.0.21\n  selector: {{app: web}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-1, namespace: default, labels: {{app: web}}}}\nstatus: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n",
            ip = web.ipv4
        ),
    );
    let _forwarder = Forwarder::start(&node.netns, api.port());
    let cgroup = TestCgroup::new();
    let bpffs = BpffsDir::new();
    let admin = admin_addr().to_string();
    let files_source = format!("files:{}", files.as_str());
    let mut agent = Agent::spawn(
        &node,
        &[
            "run",
            "--source",
            "kube",
            "--source",
            &files_source,
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--bpffs",
            bpffs.as_str(),
            "--cgroup",
            cgroup.path().to_str().unwrap(),
            "--admin",
            &admin,
            "--node-ip",
            NODE_IP,
            "--gateway",
            "default/edge",
        ],
    );
    agent.wait_ready(admin_addr(), Duration::from_secs(60));

    let addr = format!("{NODE_IP}:443").parse().unwrap();
    let ca_der = ca.der();
    let get = || tls::https_get(&client, addr, "a.example.com", "/", &ca_der, None);
    let serves = |der: &[u8]| {
        wait_until(FOLLOW, || {
            get().is_ok_and(|r| {
                r.status == 200 && r.header("x-backend-id") == Some("web") && r.peer_cert == der
            })
        })
    };
    assert!(serves(&first.der), "{:?}\n{}", get(), agent.log());
    assert!(
        agent.log().lines().any(|l| l.contains("watching")
            && l.contains("Secret")
            && l.contains("Some(\"default\")")),
        "the Secrets of the gateway's namespace are watched:\n{}",
        agent.log()
    );

    // Rotated: the new certificate on new handshakes, the listener untouched.
    let second = ca.leaf("a.example.com");
    api.apply(&tls::tls_secret("a-cert", &second));
    assert!(serves(&second.der), "{:?}\n{}", get(), agent.log());

    // Malformed: an error naming the Secret and the server field; the last good one serves.
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    api.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: a-cert, namespace: default}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
        b64("not a certificate"),
        b64(&second.key_pem)
    ));
    let malformed_logged = wait_until(FOLLOW, || {
        agent.log().lines().any(|l| {
            l.contains("last good certificate keeps serving")
                && l.contains("default/edge spec.servers[0].tls.credentialName")
                && l.contains("secret default/a-cert")
        })
    });
    assert!(malformed_logged, "{}", agent.log());
    assert_eq!(get().map(|r| r.peer_cert), Ok(second.der.clone()));

    // Deleted: the same.
    api.kubectl(&["delete", "secret", "a-cert"]);
    let deleted_logged = wait_until(FOLLOW, || {
        agent.log().contains("secret default/a-cert not found")
    });
    assert!(deleted_logged, "{}", agent.log());
    assert_eq!(get().map(|r| r.peer_cert), Ok(second.der.clone()));

    // And back: a third certificate is picked up.
    let third = ca.leaf("a.example.com");
    api.apply(&tls::tls_secret("a-cert", &third));
    assert!(serves(&third.der), "{:?}\n{}", get(), agent.log());
    let binds = agent
        .log()
        .lines()
        .filter(|l| l.contains("gateway listening") && l.contains(&format!("{NODE_IP}:443 ")))
        .count();
    assert_eq!(binds, 1, "rotation must not rebind:\n{}", agent.log());
    assert!(agent.try_wait().is_none(), "{}", agent.log());
}

#[test]
fn a_workload_sidecar_from_the_api_server_finds_its_pod_by_uid() {
    let c = Cluster::start(("80", "20"), &[], |_| {});
    // A destination nothing registers, and the v1 Pod's cgroup named as kubelet names it,
    // after the uid the API server gave the Pod.
    let stray = c.node.add_pod("stray");
    let _server = TcpIdentityServer::start(&stray, stray.sock_v4(8080), "stray");
    let to_stray = format!("{}:8080", stray.ipv4);
    let uid = c.api.kubectl(&[
        "get",
        "pod",
        "tcp-echo-v1-a",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    assert_eq!(uid.len(), 36, "unexpected uid {uid:?}");
    let v1_cgroup = c.client.child(&format!("pod{uid}"));
    let from = |cgroup: &TestCgroup| {
        run_probe(
            Some(&c.node.netns),
            Some(cgroup),
            &[
                "tcp",
                "--to",
                &to_stray,
                "--count",
                "1",
                "--timeout-ms",
                "500",
            ],
        )
    };
    assert_eq!(
        from(&v1_cgroup).successes(),
        1,
        "ALLOW_ANY before the Sidecar"
    );
    c.api.apply(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: v1-locked, namespace: default}\nspec:\n  workloadSelector: {labels: {app: tcp-echo, version: v1}}\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
    );
    let refused = wait_until(FOLLOW, || from(&v1_cgroup).failures == 1);
    assert!(refused, "the Sidecar never took effect:\n{}", c.agent.log());
    assert_eq!(from(&c.client).successes(), 1, "outside the Pod's cgroup");
    // The registered service still works from the locked Pod.
    let r = run_probe(
        Some(&c.node.netns),
        Some(&v1_cgroup),
        &["tcp", "--to", &c.to(9000), "--count", "3"],
    );
    assert_eq!(r.successes(), 3, "{r:?}");
}
