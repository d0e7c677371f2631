//! The relay's small HTTP server: `GET /metrics` (Prometheus), `/healthz`, `/readyz`, and
//! `POST /v1/feedback` ([`feedback`](crate::feedback)). One request per connection
//! (`Connection: close`), which is all Prometheus, kubelet probes and feedback loops need.
//! Request bodies need a `Content-Length` and are read only after the caller was admitted.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::feedback::{Answer, FeedbackService, MAX_BODY_BYTES};
use crate::metrics::Metrics;

/// Largest request head (request line and headers).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long, and how much, of an unread request body is drained after the answer.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = MAX_BODY_BYTES;

/// What the handlers need.
#[derive(Debug)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub feedback: Arc<FeedbackService>,
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move { handle(stream, &state).await });
    }
}

struct Head {
    method: String,
    path: String,
    content_length: Option<usize>,
    chunked: bool,
    authorization: Option<String>,
}

enum HeadError {
    /// The connection ended or timed out: nothing to answer.
    Gone,
    TooLarge,
    Malformed,
}

async fn read_head(r: &mut BufReader<TcpStream>) -> Result<Head, HeadError> {
    let mut lines: Vec<String> = Vec::new();
    let mut total = 0usize;
    loop {
        let mut line = Vec::new();
        let n = tokio::time::timeout(READ_TIMEOUT, r.read_until(b'\n', &mut line))
            .await
            .map_err(|_| HeadError::Gone)?
            .map_err(|_| HeadError::Gone)?;
        if n == 0 {
            return Err(HeadError::Gone);
        }
        total += n;
        if total > MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        let line = String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_string();
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    let mut first = lines
        .first()
        .ok_or(HeadError::Malformed)?
        .split_whitespace();
    let method = first.next().ok_or(HeadError::Malformed)?.to_string();
    let path = first.next().ok_or(HeadError::Malformed)?.to_string();
    let mut head = Head {
        method,
        path,
        content_length: None,
        chunked: false,
        authorization: None,
    };
    for l in lines.iter().skip(1) {
        let Some((name, value)) = l.split_once(':') else {
            return Err(HeadError::Malformed);
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(value.parse().map_err(|_| HeadError::Malformed)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = true;
        } else if name.eq_ignore_ascii_case("authorization") {
            head.authorization = Some(value.to_string());
        }
    }
    Ok(head)
}

fn text(status: u16, body: &str) -> (u16, &'static str, String) {
    (status, "text/plain", body.to_string())
}

fn json(a: Answer) -> (u16, &'static str, String) {
    (a.status, "application/json", format!("{}\n", a.body))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

async fn handle(stream: TcpStream, state: &HttpState) {
    let mut r = BufReader::new(stream);
    let (status, ctype, body) = match read_head(&mut r).await {
        Err(HeadError::Gone) => return,
        Err(HeadError::TooLarge) => text(431, "request head too large\n"),
        Err(HeadError::Malformed) => text(400, "malformed request\n"),
        Ok(head) => route(&mut r, head, state).await,
    };
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason(status),
        body.len()
    );
    if status == 401 {
        head.push_str("WWW-Authenticate: Bearer realm=\"mailfleet-feedback\"\r\n");
    }
    head.push_str("\r\n");
    let stream = r.get_mut();
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Lingering close: a refused request's body may still be arriving, and closing with
    // unread data would reset the connection before the client read the answer.
    let mut sink = [0u8; 8192];
    let mut left = LINGER_BYTES;
    while left > 0 {
        match tokio::time::timeout(LINGER, r.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

async fn route(
    r: &mut BufReader<TcpStream>,
    head: Head,
    state: &HttpState,
) -> (u16, &'static str, String) {
    let path = head.path.split('?').next().unwrap_or("/");
    let metrics = &state.metrics;
    match (head.method.as_str(), path) {
        ("GET", "/metrics") => (200, "text/plain; version=0.0.4", metrics.render()),
        ("GET", "/healthz") => text(200, "ok\n"),
        ("GET", "/readyz") if metrics.ready.load(Ordering::Relaxed) => text(200, "ready\n"),
        ("GET", "/readyz") => text(503, "not ready\n"),
        ("POST", "/v1/feedback") => {
            let answer = feedback(r, &head, &state.feedback).await;
            metrics.feedback(answer.result);
            json(answer)
        }
        (_, "/v1/feedback") => json(Answer {
            status: 405,
            body: serde_json::json!({ "error": "use POST" }).to_string(),
            result: "bad_request",
        }),
        (_, "/metrics" | "/healthz" | "/readyz") => text(405, "use GET\n"),
        _ => text(404, "not found\n"),
    }
}

async fn feedback(r: &mut BufReader<TcpStream>, head: &Head, svc: &FeedbackService) -> Answer {
    if let Some(refused) = svc.admit(head.authorization.as_deref()) {
        return refused;
    }
    let error = |status, result, message: &str| Answer {
        status,
        body: serde_json::json!({ "error": message }).to_string(),
        result,
    };
    if head.chunked {
        return error(
            411,
            "bad_request",
            "chunked bodies are not supported: send Content-Length",
        );
    }
    let Some(len) = head.content_length else {
        return error(411, "bad_request", "Content-Length is required");
    };
    if len > MAX_BODY_BYTES {
        return error(
            413,
            "too_large",
            &format!("the report is larger than {MAX_BODY_BYTES} bytes"),
        );
    }
    let mut body = vec![0u8; len];
    match tokio::time::timeout(READ_TIMEOUT, r.read_exact(&mut body)).await {
        Ok(Ok(_)) => {}
        _ => return error(400, "bad_request", "the body ended before Content-Length"),
    }
    svc.handle(&body).await
}
