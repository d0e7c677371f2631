//! Fuzzes the SMTP command parser the relay's sessions use (smtp-proto plus our wrapper) and
//! the address helpers applied to what it returns: no input may panic or hang them.
//! Run: `cargo +nightly fuzz run smtp_command` from the repository root.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailfleet_relay::smtp::{address_domain, matching_sending_domain, parse_command};

fuzz_target!(|data: &[u8]| {
    // Sessions hand the parser one line with its terminator; mimic that and also raw bytes.
    let mut line = data.to_vec();
    line.extend_from_slice(b"\r\n");
    for input in [data, &line[..]] {
        if let Ok(req) = parse_command(input) {
            if let smtp_proto::Request::Mail { from } = &req {
                if let Some(d) = address_domain(&from.address) {
                    let _ = matching_sending_domain(&["example.test".to_string()], &d);
                }
            }
            if let smtp_proto::Request::Rcpt { to } = &req {
                let _ = address_domain(&to.address);
            }
        }
    }
});
