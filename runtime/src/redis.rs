//! One `--redis-url` syntax for every binary (gateway, router, loadtest) and one connection for it.
//!
//! Forms:
//! - `redis://[user:password@]host:port[/db]`: a single Redis (`rediss://` and `unix://` as
//!   redis-rs parses them);
//! - `redis+cluster://[user:password@]host:port[,host:port...][/]`: a Redis Cluster, reached
//!   through any of the listed seed nodes (the client reads the slot map from them and follows
//!   `MOVED`/`ASK` and failovers by itself);
//! - `redis://host:port,redis://host:port[,...]`: the same cluster as a list of node URLs (two or
//!   more).
//!
//! Either form takes two options of ours in the query string (removed before redis-rs sees it):
//! `wait-replicas=N` asks writers that decide something (the gateway's report and sweep scripts)
//! to follow each such script with `WAIT N <timeout>` in the same pipeline, so one report stays
//! one round trip; `wait-timeout=100ms` bounds that wait (default 100ms). Readers ignore both.
//!
//! A cluster has one database: a database number other than 0 is refused.

use std::fmt;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, Value};

use crate::duration::DurationParser;

/// Scheme of the cluster form.
pub const CLUSTER_SCHEME: &str = "redis+cluster";

const WAIT_REPLICAS: &str = "wait-replicas";
const WAIT_TIMEOUT: &str = "wait-timeout";
const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_millis(100);
const WAIT_TIMEOUT_SYNTAX: DurationParser = DurationParser::new()
    .bare_millis()
    .positive()
    .at_most(Duration::from_secs(10));

/// A `--redis-url` that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrlError(String);

impl fmt::Display for RedisUrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RedisUrlError {}

fn invalid(detail: impl Into<String>) -> RedisUrlError {
    RedisUrlError(detail.into())
}

/// How many replicas a deciding write waits for (`wait-replicas`, `wait-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitReplicas {
    /// Replicas that must acknowledge the write.
    pub replicas: u32,
    /// How long to wait for them.
    pub timeout: Duration,
}

/// A parsed `--redis-url`: a single Redis or a cluster, and the write options.
#[derive(Clone)]
pub struct RedisTarget {
    nodes: Vec<ConnectionInfo>,
    cluster: bool,
    wait: Option<WaitReplicas>,
    redacted: String,
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &self.redacted)
            .field("cluster", &self.cluster)
            .field("wait", &self.wait)
            .finish()
    }
}

/// The URL without credentials, as logs show it.
impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl std::str::FromStr for RedisTarget {
    type Err = RedisUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        Self::parse(url)
    }
}

/// Bounds of the connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Connecting to a node.
    pub connect: Duration,
    /// One reply.
    pub response: Duration,
}

impl RedisTarget {
    /// Parses one of the forms of the module documentation.
    pub fn parse(url: &str) -> Result<Self, RedisUrlError> {
        let url = url.trim();
        if url.is_empty() {
            return Err(invalid("empty Redis URL"));
        }
        let mut options = Options::default();
        let (urls, cluster) = if let Some(rest) = strip_scheme(url, CLUSTER_SCHEME) {
            (cluster_node_urls(rest)?, true)
        } else if url.contains(',') {
            let urls: Vec<String> = url.split(',').map(|u| u.trim().to_owned()).collect();
            if urls.iter().any(|u| u.is_empty() || !u.contains("://")) {
                return Err(invalid(format!(
                    "a list of cluster nodes is comma-separated URLs (redis://host:port,...), or \
                     use {CLUSTER_SCHEME}://host:port,host:port: {}",
                    redact(url)
                )));
            }
            (urls, true)
        } else {
            (vec![url.to_owned()], false)
        };
        let mut nodes = Vec::with_capacity(urls.len());
        for node in &urls {
            let stripped = options.take_from(node)?;
            let info = stripped
                .as_str()
                .into_connection_info()
                .map_err(|e| invalid(format!("invalid Redis URL {}: {e}", redact(node))))?;
            if cluster && info.redis_settings().db() != 0 {
                return Err(invalid(format!(
                    "a Redis Cluster has only database 0: {}",
                    redact(node)
                )));
            }
            nodes.push(info);
        }
        let wait = match options.replicas {
            None | Some(0) => None,
            Some(replicas) => Some(WaitReplicas {
                replicas,
                timeout: options.timeout.unwrap_or(DEFAULT_WAIT_TIMEOUT),
            }),
        };
        Ok(Self {
            nodes,
            cluster,
            wait,
            redacted: redact(url),
        })
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The seed nodes (one for a single Redis).
    pub fn nodes(&self) -> &[ConnectionInfo] {
        &self.nodes
    }

    /// `wait-replicas` and `wait-timeout`, if asked for.
    pub fn wait_replicas(&self) -> Option<WaitReplicas> {
        self.wait
    }

    /// A connection that connects on first use and reconnects by itself (a Redis that is down at
    /// start-up, restarts or fails over only fails the calls made meanwhile). Fails only when the
    /// client cannot be built from the URL.
    pub fn connect_lazy(&self, timeouts: Timeouts) -> redis::RedisResult<RedisConnection> {
        if self.cluster {
            let client = ClusterClientBuilder::new(self.nodes.clone())
                .connection_timeout(timeouts.connect)
                .response_timeout(timeouts.response)
                .retries(2)
                .max_retry_wait(500)
                .build()?;
            let config = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(timeouts.connect)
                .set_response_timeout(timeouts.response);
            Ok(RedisConnection::Cluster(
                client.get_pending_async_connection_with_config(config),
            ))
        } else {
            let client = redis::Client::open(self.nodes[0].clone())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeouts.connect))
                .set_response_timeout(Some(timeouts.response))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            Ok(RedisConnection::Single(
                ConnectionManager::new_lazy_with_config(client, config)?,
            ))
        }
    }
}

/// A connection to a single Redis or a Redis Cluster. Commands, pipelines and scripts are used
/// the same way on both: in a cluster each goes to the master of its first key's slot (every key
/// of one script or pipeline must share a slot; Apollo's keys carry a hash tag for that), and
/// keyless commands go where redis-rs routes them (`PING` and `SCRIPT LOAD` to every master).
/// Cheap to clone; clones share the connections.
#[derive(Clone)]
pub enum RedisConnection {
    /// A single Redis.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// A Lua script with its keys and arguments, called as `EVALSHA`, or as `EVAL` with the code when
/// the node does not have the script cached (a fresh node, a restarted one, or a replica promoted
/// by a failover: script caches are not replicated); `EVAL` caches it on that node, so later
/// calls are `EVALSHA` again. Both route by the first key's slot in a cluster. `SCRIPT LOAD`
/// (what redis-rs' `Script` falls back to) is avoided: a cluster client sends it to every node
/// and it fails while any one of them is down.
#[derive(Clone, Debug)]
pub struct Eval {
    sha: String,
    code: &'static str,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl Eval {
    /// The script `code`, with no keys or arguments yet.
    pub fn new(code: &'static str) -> Self {
        Self {
            sha: redis::Script::new(code).get_hash().to_owned(),
            code,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    /// The same script with no keys or arguments yet.
    pub fn call(&self) -> Self {
        Self {
            sha: self.sha.clone(),
            code: self.code,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Adds a key.
    pub fn key(&mut self, key: impl Into<String>) -> &mut Self {
        self.keys.push(key.into());
        self
    }

    /// Adds an argument.
    pub fn arg(&mut self, arg: impl redis::ToRedisArgs) -> &mut Self {
        self.args.extend(arg.to_redis_args());
        self
    }

    /// The command: `EVALSHA` when `cached`, else `EVAL` with the code.
    pub fn cmd(&self, cached: bool) -> Cmd {
        let mut cmd = if cached {
            let mut c = redis::cmd("EVALSHA");
            c.arg(&self.sha);
            c
        } else {
            let mut c = redis::cmd("EVAL");
            c.arg(self.code);
            c
        };
        cmd.arg(self.keys.len()).arg(&self.keys);
        for a in &self.args {
            cmd.arg(a.as_slice());
        }
        cmd
    }

    /// Runs it: `EVALSHA`, then `EVAL` once if the node lacks the script.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        connection: &mut RedisConnection,
    ) -> redis::RedisResult<T> {
        match self.cmd(true).query_async(connection).await {
            Err(e) if is_noscript(&e) => self.cmd(false).query_async(connection).await,
            other => other,
        }
    }
}

/// Whether a call failed because the node does not have the script cached.
pub fn is_noscript(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// `scheme://` stripped, case-insensitively.
fn strip_scheme<'a>(url: &'a str, scheme: &str) -> Option<&'a str> {
    let (head, rest) = url.split_once("://")?;
    head.eq_ignore_ascii_case(scheme).then_some(rest)
}

/// `[userinfo@]host:port,host:port[/path][?query]` into one `redis://` URL per node.
fn cluster_node_urls(rest: &str) -> Result<Vec<String>, RedisUrlError> {
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((user, hosts)) => (format!("{user}@"), hosts),
        None => (String::new(), authority),
    };
    let urls: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|host| format!("redis://{userinfo}{host}{tail}"))
        .collect();
    if urls.is_empty() {
        return Err(invalid(format!(
            "{CLUSTER_SCHEME}:// needs at least one host:port"
        )));
    }
    Ok(urls)
}

/// Our query options, collected from every node URL (they must agree).
#[derive(Default)]
struct Options {
    replicas: Option<u32>,
    timeout: Option<Duration>,
}

impl Options {
    /// Removes `wait-replicas` and `wait-timeout` from `url`'s query, remembering them.
    fn take_from(&mut self, url: &str) -> Result<String, RedisUrlError> {
        let Some((base, query)) = url.split_once('?') else {
            return Ok(url.to_owned());
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                WAIT_REPLICAS => {
                    let n: u32 = value.parse().map_err(|_| {
                        invalid(format!("{WAIT_REPLICAS}={value:?}: expected a count"))
                    })?;
                    agree(&mut self.replicas, n, WAIT_REPLICAS)?;
                }
                WAIT_TIMEOUT => {
                    let t = WAIT_TIMEOUT_SYNTAX
                        .parse(value)
                        .map_err(|e| invalid(format!("{WAIT_TIMEOUT}={value:?}: {e}")))?;
                    agree(&mut self.timeout, t, WAIT_TIMEOUT)?;
                }
                _ => kept.push(pair),
            }
        }
        Ok(if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        })
    }
}

fn agree<T: PartialEq + fmt::Debug>(
    slot: &mut Option<T>,
    value: T,
    name: &str,
) -> Result<(), RedisUrlError> {
    match slot {
        Some(old) if *old != value => Err(invalid(format!(
            "{name} given twice with different values ({old:?}, {value:?})"
        ))),
        _ => {
            *slot = Some(value);
            Ok(())
        }
    }
}

/// `url` with every password (the userinfo of each node URL) replaced by `***`.
pub fn redact(url: &str) -> String {
    url.split(',')
        .map(|part| match (part.find("://"), part.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://***{}", &part[..scheme], &part[at..])
            }
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::ConnectionAddr;

    fn addrs(target: &RedisTarget) -> Vec<String> {
        target
            .nodes()
            .iter()
            .map(|n| match n.addr() {
                ConnectionAddr::Tcp(h, p) => format!("{h}:{p}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_single_redis() {
        let t = RedisTarget::parse("redis://127.0.0.1:6379/2").expect("parse");
        assert!(!t.is_cluster());
        assert_eq!(addrs(&t), ["127.0.0.1:6379"]);
        assert_eq!(t.nodes()[0].redis_settings().db(), 2);
        assert_eq!(t.wait_replicas(), None);
    }

    #[test]
    fn a_cluster_by_scheme_or_by_list() {
        let by_scheme = RedisTarget::parse("redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001/")
            .expect("parse");
        assert!(by_scheme.is_cluster());
        assert_eq!(addrs(&by_scheme), ["127.0.0.1:7000", "127.0.0.1:7001"]);
        assert!(by_scheme
            .nodes()
            .iter()
            .all(|n| n.redis_settings().password() == Some("pw")));
        assert_eq!(
            by_scheme.to_string(),
            "redis+cluster://***@127.0.0.1:7000,127.0.0.1:7001/"
        );

        let one_seed = RedisTarget::parse("REDIS+CLUSTER://127.0.0.1:7000").expect("parse");
        assert!(one_seed.is_cluster());
        assert_eq!(addrs(&one_seed), ["127.0.0.1:7000"]);

        let by_list =
            RedisTarget::parse("redis://127.0.0.1:7000, redis://127.0.0.1:7001").expect("parse");
        assert!(by_list.is_cluster());
        assert_eq!(addrs(&by_list), ["127.0.0.1:7000", "127.0.0.1:7001"]);
    }

    #[test]
    fn wait_options_are_ours_and_other_query_options_go_to_redis_rs() {
        let t = RedisTarget::parse(
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001/?wait-replicas=1&protocol=resp3",
        )
        .expect("parse");
        assert_eq!(
            t.wait_replicas(),
            Some(WaitReplicas {
                replicas: 1,
                timeout: DEFAULT_WAIT_TIMEOUT
            })
        );
        assert_eq!(
            t.nodes()[0].redis_settings().protocol(),
            redis::ProtocolVersion::RESP3
        );
        let t = RedisTarget::parse("redis://h:1/?wait-replicas=2&wait-timeout=250ms").expect("ok");
        assert_eq!(
            t.wait_replicas(),
            Some(WaitReplicas {
                replicas: 2,
                timeout: Duration::from_millis(250)
            })
        );
        let off = RedisTarget::parse("redis://h:1/?wait-replicas=0").expect("parse");
        assert_eq!(off.wait_replicas(), None);
    }

    #[test]
    fn malformed_urls_are_refused_with_a_reason() {
        for (url, reason) in [
            ("", "empty"),
            ("redis+cluster://", "at least one host"),
            ("redis+cluster://h:1/3", "only database 0"),
            ("redis://h:1,h:2", "comma-separated URLs"),
            ("redis://h:1/?wait-replicas=x", "expected a count"),
            (
                "redis://h:1/?wait-timeout=1h&wait-replicas=1",
                "wait-timeout",
            ),
            (
                "redis://:a@h:1/?wait-replicas=1,redis://:a@h:2/?wait-replicas=2",
                "different values",
            ),
            ("bogus://h:1", "invalid Redis URL"),
        ] {
            let err = RedisTarget::parse(url).expect_err(url).to_string();
            assert!(err.contains(reason), "{url}: {err}");
        }
        // Passwords never reach an error message.
        let err = RedisTarget::parse("redis://:secret@h:1,nope")
            .expect_err("refused")
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn redact_hides_every_password() {
        assert_eq!(redact("redis://:pw@h:1/"), "redis://***@h:1/");
        assert_eq!(redact("redis://h:1/"), "redis://h:1/");
        assert_eq!(
            redact("redis://:a@h:1,redis://u:b@h:2"),
            "redis://***@h:1,redis://***@h:2"
        );
    }
}
