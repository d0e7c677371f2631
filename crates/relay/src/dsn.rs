//! Delivery status notifications (RFC 3464) for recipients that bounced, sent with a null
//! return path to the original sender, and the RFC 5322 date used in headers.

use crate::client::Reply;
use crate::spool::Message;

/// `Sun, 22 Nov 2026 19:07:29 +0000` for Unix seconds `t`.
pub fn rfc2822_date(t: u64) -> String {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), valid for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        WD[days.rem_euclid(7) as usize],
        day,
        MON[(month - 1) as usize],
        year,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The headers of the original message (up to the first empty line), for the DSN's third part.
fn original_headers(data: &[u8]) -> &[u8] {
    data.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(data, |p| &data[..p + 2])
}

/// Builds the DSN message for `failed_rcpt` of `original`.
pub fn build(
    hostname: &str,
    original: &Message,
    failed_rcpt: &str,
    reply: &Reply,
    id: u64,
) -> Vec<u8> {
    let now = crate::shaping::unix_now() as u64;
    let boundary = format!("{id:x}/{hostname}");
    let status = reply
        .enhanced()
        .map_or_else(|| "5.0.0".to_string(), |(c, s, d)| format!("{c}.{s}.{d}"));
    let mut m = String::new();
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
    ));
    m.push_str(&format!("To: <{}>\r\n", original.mail_from));
    m.push_str("Subject: Undelivered Mail Returned to Sender\r\n");
    m.push_str(&format!("Date: {}\r\n", rfc2822_date(now)));
    m.push_str(&format!("Message-ID: <dsn.{id:x}@{hostname}>\r\n"));
    m.push_str("Auto-Submitted: auto-replied\r\n");
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ));
    m.push_str(&format!(
        "This is the mail system at {hostname}.\r\n\r\nYour message could not be delivered to <{failed_rcpt}>.\r\nThe receiving server said: {reply}\r\n\r\n"
    ));
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    m.push_str(&format!(
        "Reporting-MTA: dns; {hostname}\r\nArrival-Date: {}\r\n\r\n",
        rfc2822_date(original.received_at)
    ));
    m.push_str(&format!(
        "Final-Recipient: rfc822; {failed_rcpt}\r\nAction: failed\r\nStatus: {status}\r\nDiagnostic-Code: smtp; {reply}\r\n\r\n"
    ));
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    ));
    let mut out = m.into_bytes();
    out.extend_from_slice(original_headers(&original.data));
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc2822() {
        assert_eq!(rfc2822_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc2822_date(1_795_374_449),
            "Sun, 22 Nov 2026 19:07:29 +0000"
        );
        assert_eq!(rfc2822_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn dsn_names_recipient_status_and_original_headers() {
        let original = Message {
            id: 1,
            received_at: 0,
            mail_from: "sender@example.test".into(),
            rcpts: vec!["gone@dest.test".into()],
            data: b"Subject: hello\r\nFrom: sender@example.test\r\n\r\nsecret body\r\n".to_vec(),
        };
        let reply = Reply {
            code: 550,
            text: "5.1.1 no such user".into(),
        };
        let dsn =
            String::from_utf8(build("relay.test", &original, "gone@dest.test", &reply, 9)).unwrap();
        assert!(dsn.contains("To: <sender@example.test>"));
        assert!(dsn.contains("Final-Recipient: rfc822; gone@dest.test"));
        assert!(dsn.contains("Status: 5.1.1"));
        assert!(dsn.contains("Subject: hello"));
        assert!(!dsn.contains("secret body"));
    }
}
