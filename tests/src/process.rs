//! Realm's binaries as child processes: started with arguments and environment, their announced
//! address read from stdout, killed when dropped so a failing test leaves nothing running.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::{binary, repo_root};

/// A running binary, killed when dropped.
pub struct Process {
    pub child: Child,
    /// The `host:port` it announced.
    pub addr: String,
    /// What else it announced serving before, as `(what, host:port)` (e.g. `("http", ...)`).
    pub serving: Vec<(String, String)>,
}

impl Process {
    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `host:port` it announced serving `what` on (e.g. `"HTTP"`).
    pub fn served(&self, what: &str) -> &str {
        self.serving
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, addr)| addr.as_str())
            .unwrap_or_else(|| panic!("it announced no {what} address: {:?}", self.serving))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `bin` with `args` and `env` (one compute thread unless `env` says otherwise) and waits
/// for its `<bin> listening on ADDR` line on stdout; stderr goes where `stderr` says.
pub fn start_with(bin: &str, args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Process {
    let mut command = Command::new(binary(bin));
    command
        .args(args)
        .current_dir(repo_root())
        .env("REALM_THREADS", "1")
        .env_remove("REALM_CLUSTER_TOKEN")
        .env_remove("REALM_API_KEY")
        .stdout(Stdio::piped())
        .stderr(stderr);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut serving = Vec::new();
    loop {
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("read the listening line");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            [b, "listening", "on", addr] if b == bin => {
                return Process {
                    addr: addr.to_string(),
                    child,
                    serving,
                }
            }
            [b, "serving", what, "on", addr] if b == bin => {
                serving.push((what.to_string(), addr.to_string()))
            }
            _ => {
                let status = child.wait().ok();
                panic!("{bin} did not start (status {status:?}), printed {line:?}");
            }
        }
    }
}

/// As [`start_with`], stderr inherited.
pub fn start(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
    start_with(bin, args, env, Stdio::inherit())
}
