//! The relay's HTTP endpoints (`/status`, `/readyz`, `/metrics`) over a plain HTTP/1.1 client.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The relay's `/status`, or null while it does not answer yet.
pub fn status(port: u16) -> serde_json::Value {
    match http_get(port, "/status") {
        Ok((200, body)) => serde_json::from_str(&body).expect("status is JSON"),
        _ => serde_json::Value::Null,
    }
}

/// Whether the relay's `/readyz` answers 200.
pub fn ready(port: u16) -> bool {
    matches!(http_get(port, "/readyz"), Ok((200, _)))
}

/// The relay's `/metrics` text, or None while it does not answer 200.
pub fn scrape(port: u16) -> Option<String> {
    match http_get(port, "/metrics") {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

/// The value of the first `/metrics` line starting with `line_prefix`.
pub fn metric(port: u16, line_prefix: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics").ok()?;
    body.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A plain HTTP/1.1 GET to 127.0.0.1:`port`: (status code, body), or the connection error.
pub fn http_get(port: u16, path: &str) -> io::Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // One write: a request split over several segments can race a server that answers
    // after the first read and closes.
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_http_response(&raw)
}

pub(crate) fn parse_http_response(raw: &[u8]) -> io::Result<(u16, String)> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body).ok_or_else(|| bad("bad chunked body"))?
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}
