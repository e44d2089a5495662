use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::process::Proc;

/// A real `redis-server` on an ephemeral 127.0.0.1 port with persistence off. Killed on drop.
pub struct RedisServer {
    port: u16,
    data_dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl RedisServer {
    /// Starts redis-server and waits until it answers PING.
    pub async fn start() -> Self {
        let data_dir = tempfile::Builder::new()
            .prefix("apollo-redis-")
            .tempdir()
            .expect("create a redis data dir");
        let mut server = Self {
            port: crate::free_port(),
            data_dir,
            proc: None,
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let program = which("redis-server");
        let proc = Proc::builder(program)
            .name(format!("redis-{}", self.port))
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.data_dir.path())
            .spawn();
        self.proc = Some(proc);
        let start = Instant::now();
        while !self.ping() {
            if let Some(p) = self.proc.as_mut() {
                if let Some(status) = p.try_wait() {
                    panic!("redis-server exited ({status}):\n{}", p.logs());
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server on port {} did not answer PING within 10s",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server answers PING right now.
    pub fn ping(&self) -> bool {
        self.command(&["PING"])
            .is_some_and(|r| r.starts_with("+PONG"))
    }

    /// Sends one command (RESP) and returns the raw reply, or None if the server is unreachable.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        resp_command(self.port, args)
    }

    /// Kills the server (SIGKILL: all state lost) and starts a fresh one on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// Pauses the server (SIGSTOP): connections stay open, nothing answers, as with a hung
    /// machine; [`RedisServer::resume`] continues it with its state intact.
    pub fn pause(&self) {
        if let Some(p) = &self.proc {
            p.signal(nix::sys::signal::Signal::SIGSTOP);
        }
    }

    /// Continues a paused server (SIGCONT).
    pub fn resume(&self) {
        if let Some(p) = &self.proc {
            p.signal(nix::sys::signal::Signal::SIGCONT);
        }
    }

    /// Kills the server; `restart` brings it back on the same port.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// Sends one command (RESP) to 127.0.0.1:`port` and returns the raw reply, or None if nothing
/// answers.
pub(crate) fn resp_command(port: u16, args: &[&str]) -> Option<String> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.write_all(req.as_bytes()).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = stream.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The path of a Redis program (`redis-server`, `redis-cli`) on PATH.
pub(crate) fn which(program: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join(program);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{program} is not installed; scripts/test.sh installs it (apt-get install redis-server \
         redis-tools)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_answers_and_restarts_empty() {
        let mut redis = RedisServer::start().await;
        assert!(redis
            .command(&["SET", "k", "v"])
            .is_some_and(|r| r.starts_with("+OK")));
        redis.restart().await;
        assert!(redis.ping());
        let reply = redis.command(&["GET", "k"]).expect("reply");
        assert!(
            reply.starts_with("$-1"),
            "state survived a restart: {reply:?}"
        );
    }
}
