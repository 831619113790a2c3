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

/// The arguments of `realm-coordinator serve` on a free loopback port for `model` over
/// `workers` (in plan order), then `extra`.
pub fn serve_args(model: &std::path::Path, workers: &[&Process], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["serve", "--listen", "127.0.0.1:0", "--model"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(model.to_str().expect("a UTF-8 model path").to_string());
    for w in workers {
        args.push("--worker".into());
        args.push(w.url());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The command that runs `bin` with `args` and `env` (one compute thread unless `env` says
/// otherwise), from the repository's root, without the secrets of the test's own environment.
pub fn command(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(binary(bin));
    command
        .args(args)
        .current_dir(repo_root())
        .env("REALM_THREADS", "1")
        .env_remove("REALM_CLUSTER_TOKEN")
        .env_remove("REALM_API_KEY");
    for (k, v) in env {
        command.env(k, v);
    }
    command
}

/// Starts `bin` with `args` and `env` (one compute thread unless `env` says otherwise) and waits
/// for its `<bin> listening on ADDR` line on stdout; stderr goes where `stderr` says.
pub fn start_with(bin: &str, args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Process {
    start_command(bin, command(bin, args, env), stderr)
}

/// Runs `command`, which starts `bin` (perhaps through a wrapper), and waits for its
/// `<bin> listening on ADDR` line on stdout.
pub fn start_command(bin: &str, mut command: Command, stderr: Stdio) -> Process {
    command.stdout(Stdio::piped()).stderr(stderr);
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
