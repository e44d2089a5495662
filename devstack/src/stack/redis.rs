//! The stack's Redis: a redis-server of its own (the default), a Redis Cluster of its own, or one
//! the user runs (`loadtest --redis-url`).

use apollo_test_support::{RedisCluster, RedisServer};

/// Which Redis the gateways and the router use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RedisChoice {
    /// A redis-server started with the stack on an ephemeral port.
    #[default]
    Server,
    /// A Redis Cluster started with the stack (`masters` masters, `replicas` replicas each).
    Cluster {
        /// Masters (3 or more).
        masters: usize,
        /// Replicas per master.
        replicas: usize,
    },
    /// A Redis already running: any `--redis-url` form (`apollo_runtime::redis`).
    External(String),
}

/// The running Redis of a stack.
pub(super) enum StackRedis {
    Server(RedisServer),
    Cluster(RedisCluster),
    External(String),
}

impl StackRedis {
    pub(super) async fn start(choice: &RedisChoice) -> Self {
        match choice {
            RedisChoice::Server => Self::Server(RedisServer::start().await),
            RedisChoice::Cluster { masters, replicas } => {
                Self::Cluster(RedisCluster::start(*masters, *replicas).await)
            }
            RedisChoice::External(url) => Self::External(url.clone()),
        }
    }

    /// The `--redis-url` of the gateways and the router.
    pub(super) fn url(&self) -> String {
        match self {
            Self::Server(s) => s.url(),
            Self::Cluster(c) => c.url(),
            Self::External(url) => url.clone(),
        }
    }

    pub(super) fn server(&mut self) -> Option<&mut RedisServer> {
        match self {
            Self::Server(s) => Some(s),
            _ => None,
        }
    }

    pub(super) fn cluster(&mut self) -> Option<&mut RedisCluster> {
        match self {
            Self::Cluster(c) => Some(c),
            _ => None,
        }
    }

    pub(super) fn stop(&mut self) {
        match self {
            Self::Server(s) => s.stop(),
            Self::Cluster(c) => c.stop(),
            Self::External(_) => {}
        }
    }
}
