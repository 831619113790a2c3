//! Addresses and gRPC channels: how the coordinator reaches workers and how clients reach the
//! coordinator. One place sets message-size limits, timeouts and HTTP/2 windows for both.

use std::time::Duration;

use realm_common::tls::ClientTls;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};

/// Largest gRPC message either side accepts: a prefill of the whole context in f32 is about
/// 8192 × 640 × 4 bytes = 21 MB for the project models; the limit leaves room for wider ones.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// How long to wait for a TCP connection to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 flow-control windows for receiving: large enough that a prefill's hidden state
/// streams in without waiting for window updates.
const STREAM_WINDOW_BYTES: u32 = 8 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;

/// Turns `host:port`, `http://host:port[/]` or `https://host:port[/]` into `http://host:port`
/// (plaintext gRPC, the default) or `https://host:port` (TLS); any other scheme is refused.
pub fn normalize_url(raw: &str) -> std::result::Result<String, String> {
    let s = raw.trim();
    if s.is_empty() {
        return Err("empty address".to_string());
    }
    let (scheme, rest) = match s.split_once("://") {
        None => ("http", s),
        Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
        Some((scheme, _)) => {
            return Err(format!(
                "unsupported scheme `{scheme}` (use http://, or https:// for TLS)"
            ))
        }
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err("no host".to_string());
    }
    let url = format!("{scheme}://{rest}");
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    if uri.host().is_none_or(str::is_empty) || authority.ends_with(':') {
        return Err("expected host:port".to_string());
    }
    // The URI grammar admits any characters after the colon; a port is a 16-bit number.
    let port = authority
        .rsplit_once(':')
        .filter(|(_, p)| !p.ends_with(']'))
        .map(|(_, p)| p);
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(format!("bad port in `{authority}`"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!("unexpected path `{}`", uri.path()));
    }
    Ok(url)
}

/// The endpoint for a normalized `http://` URL, with Realm's timeouts and windows.
pub fn endpoint(url: &str) -> std::result::Result<Endpoint, String> {
    Ok(Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES))
}

/// As [`endpoint`], with TLS for an `https://` URL, which needs `tls` (the CA to trust).
pub fn secure_endpoint(
    url: &str,
    tls: Option<&ClientTls>,
) -> std::result::Result<Endpoint, String> {
    let endpoint = endpoint(url)?;
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let tls = tls.ok_or_else(|| {
        "an https:// address needs the CA that signed its certificate (--worker-ca for workers, \
         --ca for the client)"
            .to_string()
    })?;
    endpoint
        .tls_config(tls.0.clone())
        .map_err(|e| format!("TLS configuration: {}", error_chain(&e)))
}

/// Connects to a worker at `raw` (normalized first), naming the URL in any error.
pub async fn connect_worker(raw: &str, tls: Option<&ClientTls>) -> Result<(String, Channel)> {
    let url = normalize_url(raw).map_err(|problem| Error::WorkerUrl {
        url: raw.to_string(),
        problem,
    })?;
    let endpoint = secure_endpoint(&url, tls).map_err(|problem| Error::WorkerUrl {
        url: url.clone(),
        problem,
    })?;
    let channel = endpoint.connect().await.map_err(|e| Error::Unreachable {
        url: url.clone(),
        problem: error_chain(&e),
    })?;
    Ok((url, channel))
}

/// An error and its causes, `outer: inner: root`, for messages that must say what happened
/// (tonic's transport errors say only "transport error" at the top).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalized() {
        let ok = |s: &str| normalize_url(s).unwrap();
        assert_eq!(ok("127.0.0.1:7001"), "http://127.0.0.1:7001");
        assert_eq!(ok("http://127.0.0.1:7001/"), "http://127.0.0.1:7001");
        assert_eq!(ok("  worker-a:7001 "), "http://worker-a:7001");
        assert_eq!(ok("http://[::1]:7001"), "http://[::1]:7001");
        assert_eq!(ok("localhost"), "http://localhost");
    }

    #[test]
    fn https_needs_a_ca() {
        assert!(secure_endpoint("http://w:1", None).is_ok());
        assert!(secure_endpoint("https://w:1", None)
            .unwrap_err()
            .contains("--worker-ca"));
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason() {
        let bad = |s: &str| normalize_url(s).expect_err(s);
        assert!(bad("").contains("empty"));
        assert_eq!(normalize_url("https://w:7001/").unwrap(), "https://w:7001");
        assert!(bad("ftp://w:7001").contains("unsupported scheme `ftp`"));
        assert!(bad("http://").contains("no host"));
        assert!(bad("http://w:").contains("host:port"));
        assert!(bad("w:7001/some/path").contains("unexpected path"));
        assert!(bad("w:notaport").contains("bad port"));
        assert!(bad("w:70000").contains("bad port"));
    }

    #[tokio::test]
    async fn unreachable_workers_are_named() {
        // A port that was just free: nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = connect_worker(&format!("127.0.0.1:{port}"), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("cannot reach worker http://127.0.0.1:{port}")),
            "{err}"
        );
        assert!(err.to_lowercase().contains("refused"), "{err}");
    }
}
