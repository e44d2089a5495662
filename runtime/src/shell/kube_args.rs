//! `--kubeconfig` and the Kubernetes client built from it.

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// `--kubeconfig`, shared by every binary that talks to Kubernetes.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct KubeArgs {
    /// Kubeconfig file. Without it: $KUBECONFIG, ~/.kube/config, then the in-cluster
    /// configuration (the pod's ServiceAccount).
    #[arg(long, env = "APOLLO_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

impl KubeArgs {
    /// The client configuration: from `--kubeconfig` (its current context) when given, else
    /// inferred the usual way. Errors are kube's own (`InferKubeconfig` names the file).
    pub async fn config(&self) -> Result<kube::Config, kube::Error> {
        match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)?;
                Ok(
                    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                        .await?,
                )
            }
            None => kube::Config::infer()
                .await
                .map_err(kube::Error::InferConfig),
        }
    }

    /// A client built from [`KubeArgs::config`].
    pub async fn client(&self) -> Result<kube::Client, kube::Error> {
        kube::Client::try_from(self.config().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Args {
        #[command(flatten)]
        kube: KubeArgs,
    }

    #[test]
    fn args_are_consistent() {
        Args::command().debug_assert();
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_names_the_file() {
        let args = Args::try_parse_from(["test", "--kubeconfig", "/nonexistent/apollo/kubeconfig"])
            .expect("parse");
        let Err(error) = args.kube.client().await else {
            panic!("a client from a file that does not exist");
        };
        let message = error.to_string();
        assert!(
            message.contains("/nonexistent/apollo/kubeconfig"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn the_kubeconfig_file_names_the_cluster() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{name: k, cluster: {server: 'http://127.0.0.1:1'}}]\n\
             contexts: [{name: c, context: {cluster: k, user: u, namespace: apollo-test}}]\n\
             users: [{name: u, user: {}}]\n",
        )
        .expect("write");
        let args = KubeArgs {
            kubeconfig: Some(path),
        };
        let config = args.config().await.expect("config");
        assert_eq!(config.cluster_url.to_string(), "http://127.0.0.1:1/");
        assert_eq!(config.default_namespace, "apollo-test");
        args.client().await.expect("client");
    }
}
