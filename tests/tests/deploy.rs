//! What the container deployments rely on, with real processes on loopback: every setting comes
//! from the environment (as compose and Kubernetes pass it), the coordinator waits for workers
//! that start after it, and `realm health` answers for health checks.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use realm_tests::*;

/// A child process killed when dropped, so a failing test leaves nothing running.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// Starts a worker configured only through the environment, the way the containers start it.
fn start_worker(port: u16, budget: &str) -> Process {
    let child = Command::new(binary("realm-worker"))
        .current_dir(repo_root())
        .env("REALM_LISTEN", format!("127.0.0.1:{port}"))
        .env("REALM_MODEL", model_path(SMOLLM2))
        .env("REALM_MEMORY_BUDGET", budget)
        .env("REALM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start realm-worker");
    Process(child)
}

fn realm(args: &[&str], coordinator: &str) -> Output {
    Command::new(binary("realm"))
        .args(args)
        .env("REALM_COORDINATOR", coordinator)
        .output()
        .expect("run realm")
}

#[test]
fn coordinator_from_the_environment_waits_for_late_workers() {
    let (a, b) = (free_port(), free_port());
    let _first = start_worker(a, "32MiB");
    let mut coordinator = Command::new(binary("realm-coordinator"))
        .arg("serve")
        .current_dir(repo_root())
        .env(
            "REALM_WORKERS",
            format!("127.0.0.1:{a},http://127.0.0.1:{b}"),
        )
        .env("REALM_LISTEN", "127.0.0.1:0")
        .env("REALM_MODEL", model_path(SMOLLM2))
        .env("REALM_PLAN", "0-14,15-29")
        .env("REALM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start realm-coordinator");
    let stdout = coordinator.stdout.take().expect("stdout");
    // The second worker comes up only once the coordinator has tried and failed to reach it.
    let mut stderr = BufReader::new(coordinator.stderr.take().expect("stderr")).lines();
    let mut waited = String::new();
    for line in stderr.by_ref() {
        let line = line.expect("coordinator stderr");
        if line.contains("waiting for the workers to come up") {
            waited = line;
            break;
        }
    }
    // Keep draining, so the coordinator never blocks on a full pipe.
    std::thread::spawn(move || stderr.for_each(|line| eprintln!("{}", line.unwrap_or_default())));
    assert!(waited.contains(&format!("127.0.0.1:{b}")), "{waited:?}");
    let _second = start_worker(b, "24MiB");
    let coordinator = Process(coordinator);

    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the listening line");
    let addr = line
        .trim()
        .strip_prefix("realm-coordinator listening on ")
        .unwrap_or_else(|| panic!("coordinator did not start: {line:?}"))
        .to_string();

    let health = realm(&["health"], &addr);
    assert!(health.status.success(), "{health:?}");
    assert_eq!(String::from_utf8_lossy(&health.stdout).trim(), "SERVING");

    let out = realm(
        &[
            "generate",
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "8",
        ],
        &addr,
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Paris"), "{text:?}");

    // Each worker runs under the budget its own environment set.
    let workers = realm(&["workers"], &addr);
    let listing = String::from_utf8_lossy(&workers.stdout);
    assert!(listing.contains("/32.0 MiB"), "{listing}");
    assert!(listing.contains("/24.0 MiB"), "{listing}");
    drop(coordinator);
}

#[test]
fn coordinator_gives_up_on_workers_that_never_come() {
    let port = free_port();
    let out = Command::new(binary("realm-coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--worker", &format!("127.0.0.1:{port}")])
        .current_dir(repo_root())
        .env("REALM_MODEL", model_path(SMOLLM2))
        .env("REALM_WORKER_WAIT_SECS", "1")
        .output()
        .expect("run realm-coordinator");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("waiting for the workers to come up"), "{err}");
    assert!(
        err.contains(&format!("cannot reach worker http://127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn health_is_serving_on_a_worker_and_fails_on_a_closed_port() {
    let port = free_port();
    let _worker = start_worker(port, "64MiB");
    let addr = format!("127.0.0.1:{port}");
    let mut health = realm(&["health", &addr, "--timeout-secs", "2"], "unused:1");
    for _ in 0..100 {
        if health.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        health = realm(&["health", &addr, "--timeout-secs", "2"], "unused:1");
    }
    assert!(health.status.success(), "{health:?}");
    assert_eq!(String::from_utf8_lossy(&health.stdout).trim(), "SERVING");
    let service = realm(
        &["health", &addr, "--service", "realm.v1.Worker"],
        "unused:1",
    );
    assert!(service.status.success(), "{service:?}");

    let closed = format!("127.0.0.1:{}", free_port());
    let down = realm(&["health", &closed], "unused:1");
    assert_eq!(down.status.code(), Some(1), "{down:?}");
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(
        err.contains(&format!("cannot reach the server at http://{closed}")),
        "{err}"
    );
}
