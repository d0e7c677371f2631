//! Helpers of the relay's integration tests: finding the real peers (they must be installed:
//! hack/relay-test-deps.sh; a missing one fails the test with that hint), starting Knot with
//! MX records, the aiosmtpd sink, DKIM keys, and a minimal SMTP client for protocol tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailfleet_relay::config::*;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Path of a required program, or a failing test that says how to install it.
pub fn require(bin: &str) -> PathBuf {
    let dirs = std::env::var("PATH").unwrap_or_default();
    for d in dirs.split(':').chain(["/usr/sbin", "/sbin"]) {
        let p = Path::new(d).join(bin);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "this test needs `{bin}` on PATH (a real peer, not optional): \
         run `sudo hack/relay-test-deps.sh` to install the relay's test dependencies"
    );
}

pub fn python() -> PathBuf {
    let p = std::env::var_os("MAILFLEET_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    let ok = Command::new(&p)
        .args(["-c", "import aiosmtpd, dkim, nacl"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        panic!(
            "this test needs a Python with aiosmtpd, dkimpy and pynacl at {} (or MAILFLEET_PYTHON): \
             run `sudo hack/relay-test-deps.sh`",
            p.display()
        );
    }
    p
}

/// Runs BIND's `nsupdate` with `args`, `script` on its standard input; returns whether it
/// succeeded, and its stderr.
pub fn nsupdate(args: &[&str], script: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(require("nsupdate"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A finished command's success and its stdout followed by its stderr.
pub fn outcome(out: &std::process::Output) -> (bool, String) {
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    panic!("nothing listens on 127.0.0.1:{port}");
}

/// The aiosmtpd sink of hack/relay-sink.py.
pub struct Sink {
    pub port: u16,
    pub dir: PathBuf,
    _proc: Proc,
}

impl Sink {
    pub fn start(dir: &Path, extra: &[&str]) -> Sink {
        let port = free_port();
        let save = dir.join(format!("sink-{port}"));
        let child = Command::new(python())
            .arg(repo_root().join("hack/relay-sink.py"))
            .args(["--port", &port.to_string(), "--save"])
            .arg(&save)
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let proc = Proc(child);
        wait_port(port);
        Sink {
            port,
            dir: save,
            _proc: proc,
        }
    }

    /// Messages received so far (file contents).
    pub fn messages(&self) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "eml") {
                    out.push((p.clone(), std::fs::read_to_string(&p).unwrap_or_default()));
                }
            }
        }
        out.sort();
        out
    }

    /// Waits until `n` messages arrived (fails after `secs`).
    pub fn wait_for(&self, n: usize, secs: u64) -> Vec<(PathBuf, String)> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let m = self.messages();
            if m.len() >= n || Instant::now() > deadline {
                return m;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines().take_while(|l| !l.is_empty()).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

pub const TSIG: &str = "hmac-sha256:update-key:c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ=";

/// Knot DNS from hack/knot-up.sh, serving example.test with the given records.
pub struct Knot {
    pub port: u16,
    dir: PathBuf,
    pid: u32,
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
    }
}

/// The script that starts Knot for the tests (shared with the operator's tests).
pub fn knot_up_script() -> PathBuf {
    repo_root().join("hack/knot-up.sh")
}

impl Knot {
    /// `records` are nsupdate lines like `dest.example.test. 60 MX 10 mx.example.test.`.
    pub fn start(dir: &Path, records: &[&str]) -> Knot {
        require("knotd");
        require("nsupdate");
        let script = knot_up_script();
        let port = free_port();
        let kdir = dir.join("knot");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&kdir)
            .arg(port.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "knot-up.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let knot = Knot {
            port,
            dir: kdir,
            pid,
        };
        let adds: Vec<String> = records.iter().map(|r| format!("update add {r}")).collect();
        knot.update(&adds);
        knot
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Sends one RFC 2136 update (nsupdate lines like `update add NAME TTL TYPE DATA` or
    /// `update delete NAME TYPE`) to zone example.test, signed with the test TSIG key.
    pub fn update(&self, lines: &[String]) {
        let mut cmds = format!("server 127.0.0.1 {}\nzone example.test\n", self.port);
        for l in lines {
            cmds.push_str(l);
            cmds.push('\n');
        }
        cmds.push_str("send\n");
        let (ok, stderr) = nsupdate(&["-y", TSIG], &cmds);
        assert!(ok, "nsupdate failed: {stderr}");
    }
}

/// An RSA-2048 and an Ed25519 key as PEM, plus the DNS TXT values of their public keys.
pub struct Keys {
    pub rsa_pem: String,
    pub ed_pem: String,
    pub rsa_txt: String,
    pub ed_txt: String,
}

fn openssl(args: &[&str], dir: &Path) -> Vec<u8> {
    let out = Command::new(require("openssl"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn keys(dir: &Path) -> Keys {
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.pem",
        ],
        dir,
    );
    openssl(&["genpkey", "-algorithm", "ED25519", "-out", "ed.pem"], dir);
    let rsa_pub = openssl(
        &["pkey", "-in", "rsa.pem", "-pubout", "-outform", "DER"],
        dir,
    );
    let ed_pub = openssl(
        &["pkey", "-in", "ed.pem", "-pubout", "-outform", "DER"],
        dir,
    );
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    // An Ed25519 DKIM key is the raw 32 bytes: the tail of the SubjectPublicKeyInfo.
    let ed_raw = &ed_pub[ed_pub.len() - 32..];
    Keys {
        rsa_pem: std::fs::read_to_string(dir.join("rsa.pem")).unwrap(),
        ed_pem: std::fs::read_to_string(dir.join("ed.pem")).unwrap(),
        rsa_txt: format!("v=DKIM1; k=rsa; p={}", b64.encode(rsa_pub)),
        ed_txt: format!("v=DKIM1; k=ed25519; p={}", b64.encode(ed_raw)),
    }
}

impl Keys {
    /// Signing with both keys: selector `rsa` (RSA-2048) and `ed` (Ed25519).
    pub fn dkim_configs(&self) -> Vec<DkimKeyConfig> {
        vec![
            DkimKeyConfig {
                selector: "rsa".into(),
                algorithm: DkimAlgorithm::Rsa,
                private_key_pem: Some(self.rsa_pem.clone()),
                private_key_file: None,
            },
            DkimKeyConfig {
                selector: "ed".into(),
                algorithm: DkimAlgorithm::Ed25519,
                private_key_pem: Some(self.ed_pem.clone()),
                private_key_file: None,
            },
        ]
    }
}

/// Runs hack/relay-dkim-verify.py on `message`; returns (success, output).
pub fn dkim_verify(dir: &Path, keys: &Keys, message: &str) -> (bool, String) {
    let kf = dir.join("dkim-keys.txt");
    std::fs::write(
        &kf,
        format!(
            "rsa._domainkey.example.test {}\ned._domainkey.example.test {}\n",
            keys.rsa_txt, keys.ed_txt
        ),
    )
    .unwrap();
    let mf = dir.join("verify.eml");
    std::fs::write(&mf, message).unwrap();
    let out = Command::new(python())
        .arg(repo_root().join("hack/relay-dkim-verify.py"))
        .arg(&kf)
        .arg(&mf)
        .output()
        .unwrap();
    outcome(&out)
}

/// A relay configuration for tests: listens on a free port, trusts 127.0.0.1 only, sends
/// for example.test, leaves from `egress`.
pub fn config(dir: &Path, egress: &[(&str, &str)]) -> RelayConfig {
    let yaml = format!(
        r#"
hostname: relay.example.test
listener:
  listen: 127.0.0.1:0
  allowedNetworks: [127.0.0.1/32]
  maxRecipients: 5
  maxMessageSize: 200000
  maxBadCommands: 3
spool:
  dir: {}
sendingDomains:
  - domain: example.test
egress: []
delivery:
  retryIntervals: [0.3]
  maxLifetime: 60
  connectionIdle: 0.5
  commandTimeout: 10
"#,
        dir.join("spool").display()
    );
    let mut c: RelayConfig = serde_yaml::from_str(&yaml).unwrap();
    c.egress = egress
        .iter()
        .map(|(ip, helo)| EgressConfig {
            address: ip.parse().unwrap(),
            helo: helo.to_string(),
            daily_quota: None,
            hourly_quota: None,
            quota_window_start: 0,
            quota_window_seconds: None,
            provider_quotas: Default::default(),
            paused: false,
            warm: false,
            overflow_to_warm: false,
            max_connections: None,
            messages_per_second: None,
        })
        .collect();
    c
}

/// A line-oriented SMTP client for protocol tests, connecting from a chosen loopback address.
pub struct Client {
    r: tokio::io::BufReader<tokio::net::TcpStream>,
}

impl Client {
    pub async fn connect_from(source: &str, addr: SocketAddr) -> Client {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(source.parse().unwrap(), 0))
            .unwrap();
        let stream = sock.connect(addr).await.unwrap();
        let mut c = Client {
            r: tokio::io::BufReader::new(stream),
        };
        let g = c.reply().await;
        assert!(g.starts_with("220"), "{g}");
        c
    }

    /// Reads one complete (possibly multi-line) reply; empty at end of stream.
    pub async fn reply(&mut self) -> String {
        use tokio::io::AsyncBufReadExt;
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = self.r.read_line(&mut line).await.unwrap();
            all.push_str(&line);
            if n == 0 || line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
        }
    }

    pub async fn send(&mut self, data: &str) {
        use tokio::io::AsyncWriteExt;
        self.r.get_mut().write_all(data.as_bytes()).await.unwrap();
    }

    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await
    }
}
