//! Measures DKIM signing speed of the relay's signer: `dkim_speed KEY.pem [rsa|ed25519]`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use mailfleet_relay::config::{DkimAlgorithm, DkimKeyConfig, SendingDomainConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let algorithm = if args.get(2).map(String::as_str) == Some("ed25519") {
        DkimAlgorithm::Ed25519
    } else {
        DkimAlgorithm::Rsa
    };
    let signer = mailfleet_relay::dkim::Signer::new(&[SendingDomainConfig {
        domain: "example.test".into(),
        dkim: vec![DkimKeyConfig {
            selector: "s".into(),
            algorithm,
            private_key_pem: None,
            private_key_file: Some(args[1].clone().into()),
        }],
        suppressed_recipients: Vec::new(),
        addresses: Vec::new(),
    }])
    .unwrap();
    let msg = format!(
        "From: a@example.test\r\nTo: b@example.test\r\nSubject: x\r\n\r\n{}",
        "y".repeat(1024)
    );
    let n = 2000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        signer.sign("example.test", msg.as_bytes()).unwrap();
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "{:.0} signatures/s ({:.3} ms each)",
        n as f64 / dt,
        dt / n as f64 * 1000.0
    );
}
