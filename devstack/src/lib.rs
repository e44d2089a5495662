//! The local Apollo stack, as separate processes on loopback, on the real Kubernetes control
//! plane (etcd, kube-apiserver, kube-controller-manager from `scripts/control-plane.sh`): a
//! redis-server, a Jaeger, the controller, the gateway StatefulSet, the router and agents.
//!
//! Used by the `apollo-dev` binary (the README's run command), by the end-to-end tests and by
//! loadtest, so what a person pokes at with kubectl is exactly what the tests prove.
//!
//! The gateway StatefulSet is a real `apps/v1` StatefulSet: kube-controller-manager's StatefulSet
//! controller creates its pods and [`node`] plays their kubelet, running one `apollo-gateway`
//! process per pod and reporting the pods Running/Ready, so `kubectl scale statefulset
//! apollo-gateway --replicas=N` and `kubectl get sts,pods` behave as in a cluster. Every component
//! runs under its own ServiceAccount with the RBAC of `deploy/rbac/`.
#![forbid(unsafe_code)]

pub mod control;
pub mod fleet;
pub mod jaeger;
pub mod node;
pub mod prometheus;
pub mod samples;
pub mod stack;

pub use stack::{Kubernetes, Ports, RedisChoice, Stack, StackConfig, SYSTEM_NAMESPACE};
