use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Path of a binary built from this workspace (`target/<profile>/<name>`), next to the running
/// test executable. `cargo test --workspace` builds every package's binaries; a single-package run
/// needs `cargo build --workspace --bins` first (scripts/test.sh does it). Never invokes cargo
/// itself: cargo holds the build-directory lock while tests run, so a nested build would hang.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running test executable");
    // target/<profile>/deps/<test-binary> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(|deps| {
            if deps.file_name() == Some(OsStr::new("deps")) {
                deps.parent()
            } else {
                Some(deps)
            }
        })
        .expect("test executable lives under target/<profile>");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "binary `{name}` not found at {}; build it first with `cargo build --workspace --bins` \
         (scripts/test.sh does this)",
        path.display()
    );
    path
}

const SETPRIV: &str = "/usr/bin/setpriv";

type SpawnRequest = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from one thread that lives as long as this process. The parent-death signal
/// fires when the *thread* that forked a child ends, and test threads (or a runtime's blocking
/// threads) end long before the process: a control plane shared by every test of a binary must
/// not die with the test that happened to start it.
fn spawn_tied_to_this_process(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<std::sync::mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("apollo-test-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("start the process-spawning thread");
        Mutex::new(tx)
    });
    let (reply, answer) = std::sync::mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .expect("the spawning thread lives as long as the process");
    answer
        .recv()
        .expect("the spawning thread answers every request")
}

/// Builder for [`Proc`].
pub struct ProcBuilder {
    program: PathBuf,
    name: String,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    current_dir: Option<PathBuf>,
    log_file: Option<PathBuf>,
}

impl ProcBuilder {
    /// Appends output to this file (kept after the process ends) instead of a temporary one.
    pub fn log_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.log_file = Some(path.into());
        self
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable for the child.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Sets several environment variables for the child.
    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    /// Removes an environment variable from the child's environment.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.envs.push((key.as_ref().to_owned(), None));
        self
    }

    /// Name used in log file names and failure output (defaults to the program's file name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Working directory of the child.
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// Starts the process with stdout and stderr captured to a log file.
    pub fn spawn(self) -> Proc {
        let (log_dir, log_path) = match &self.log_file {
            Some(path) => (None, path.clone()),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix(&format!("apollo-{}-", self.name))
                    .tempdir()
                    .expect("create a log directory");
                let path = dir.path().join("output.log");
                (Some(dir), path)
            }
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("open log file {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("clone the log file handle");
        // `setpriv --pdeathsig KILL` execs the program in place (same pid) with a parent-death
        // signal: whatever happens to the test process, even SIGKILL, its children go with it.
        let mut cmd = Command::new(SETPRIV);
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        // Children inherit nothing that would make them talk OTLP or log noisily by accident.
        cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        for (k, v) in &self.envs {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        if let Some(dir) = &self.current_dir {
            cmd.current_dir(dir);
        }
        let child = spawn_tied_to_this_process(cmd)
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.program.display()));
        Proc {
            name: self.name,
            child: Some(child),
            log_path,
            _log_dir: log_dir,
        }
    }
}

/// A running child process. Killed (SIGKILL) and reaped on drop; when the test is panicking, the
/// tail of its output is printed so failures explain themselves.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
    _log_dir: Option<tempfile::TempDir>,
}

impl Proc {
    /// Starts building a process for `program`.
    pub fn builder(program: impl AsRef<Path>) -> ProcBuilder {
        let program = program.as_ref().to_owned();
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "proc".into());
        ProcBuilder {
            program,
            name,
            args: Vec::new(),
            envs: Vec::new(),
            current_dir: None,
            log_file: None,
        }
    }

    /// Name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// OS process id (None once reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the process has written to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Path of the captured output.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Waits until the output contains `needle`; panics after `deadline` with the log tail.
    pub async fn wait_for_log(&mut self, needle: &str, deadline: Duration) {
        let start = Instant::now();
        loop {
            if self.logs().contains(needle) {
                return;
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "{} exited ({status}) before logging {needle:?}; output:\n{}",
                    self.name,
                    self.logs()
                );
            }
            if start.elapsed() >= deadline {
                panic!(
                    "{} did not log {needle:?} within {deadline:?}; output:\n{}",
                    self.name,
                    tail(&self.logs(), 80)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends `signal` to the process (no-op once it has exited).
    pub fn signal(&self, signal: Signal) {
        if let Some(child) = &self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
        }
    }

    /// Exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// Waits up to `deadline` for the process to exit by itself.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if start.elapsed() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then waits up to `deadline` for a graceful exit. Returns the exit status, or None
    /// if the process had to be killed because it did not exit in time.
    pub async fn terminate(&mut self, deadline: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        let status = self.wait_exit(deadline).await;
        if status.is_none() {
            self.kill();
        }
        status
    }

    /// SIGKILL and reap (like `kill -9`): no graceful shutdown.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- last output of {} ({}) -----\n{}\n----- end of {} -----",
                self.name,
                self.log_path.display(),
                tail(&self.logs(), 60),
                self.name
            );
        }
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
