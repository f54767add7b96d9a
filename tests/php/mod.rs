//! PHP from the tests: a receiver under PHP's built-in server (`php -S 127.0.0.1:PORT`) that
//! reads each webhook through `$_POST`, and PHP scripts run as subprocesses. `.ci/run` installs
//! php-cli and php-curl; without them these tests fail, loudly.
#![allow(dead_code)]

use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const MISSING: &str =
    "php is not installed: `.ci/run` installs it (apt-get install -y php-cli php-curl)";

/// A script of `tests/php/`.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/php")).join(name)
}

/// Runs `php SCRIPT ARGS…` to its end.
pub async fn run(name: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new("php");
    cmd.arg(script(name)).args(args).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("php {name} did not finish in 30 s"))
        .unwrap_or_else(|e| panic!("{MISSING} ({e})"))
}

/// PHP's built-in server running `receiver.php` on a free loopback port; each request's
/// `json_encode($_POST)` lands in `dir` as `<webhook-id>.json`. Stopped when dropped.
pub struct PhpReceiver {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl PhpReceiver {
    pub async fn start() -> PhpReceiver {
        let dir = tempfile::tempdir().unwrap();
        // A free port: bound, then closed for php to take.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = std::fs::File::create(dir.path().join("php-server.log")).unwrap();
        let mut child = Command::new("php")
            .arg("-S")
            .arg(addr.to_string())
            .arg(script("receiver.php"))
            .env("RECEIVER_DIR", dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{MISSING} ({e})"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.path().join("php-server.log"));
                panic!("php -S {addr} exited ({status}): {log:?}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("php -S {addr} did not answer within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        PhpReceiver { addr, dir, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// What the receiver read through `$_POST` for the delivery `id`, once it arrived.
    pub async fn post_of(&self, id: &str, timeout: Duration) -> Value {
        let path = self.dir.path().join(format!("{id}.json"));
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                return serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("receiver.php wrote no JSON ({e}): {text}"));
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.path().join("php-server.log"));
                panic!(
                    "no request for delivery {id} reached the PHP receiver in {timeout:?}; its log: {log:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many webhooks it has saved.
    pub fn count(&self) -> usize {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))
            })
            .count()
    }
}

impl Drop for PhpReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
