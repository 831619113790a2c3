//! HTTP requests as a user makes them, with curl.

use std::process::Command;

use serde_json::Value;

/// What curl got: status, headers (lower-case names) and body.
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Runs curl: `body` is POSTed as JSON when given.
pub fn curl(url: &str, body: Option<&str>, headers: &[&str]) -> Reply {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-D", "-", "--max-time", "300", url]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    if let Some(body) = body {
        cmd.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let out = cmd
        .output()
        .expect("run curl (tests/python/setup.sh installs it)");
    assert!(out.status.success(), "curl {url} failed: {out:?}");
    let text = String::from_utf8(out.stdout).expect("UTF-8 reply");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers and body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    Reply {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}
