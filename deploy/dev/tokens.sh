#!/bin/sh
# docker-compose.yaml's `tokens` step: a kubeconfig for each Apollo component that talks to
# Kubernetes, holding a token of that component's own ServiceAccount (deploy/rbac, applied into the
# install namespace by the `rbac` step) from the TokenRequest API, never the admin's certificate.
# Runs in the apollo image (it carries kubectl) with the admin kubeconfig ($KUBECONFIG), whose
# server and CA the components' kubeconfigs reuse.
#
#   APOLLO_SERVICE_ACCOUNTS  e.g. "apollo-controller apollo-gateway"
#   APOLLO_IDENTITY_DIR      writes <dir>/<service account>/kubeconfig (one volume per component)
#   APOLLO_NAMESPACE         the install namespace (default apollo-system)
#   APOLLO_TOKEN_DURATION    token lifetime (default 8760h); tokens are re-issued on every run
set -eu

namespace=${APOLLO_NAMESPACE:-apollo-system}
accounts=${APOLLO_SERVICE_ACCOUNTS:?set APOLLO_SERVICE_ACCOUNTS, separated by spaces}
identity_dir=${APOLLO_IDENTITY_DIR:?set APOLLO_IDENTITY_DIR}
duration=${APOLLO_TOKEN_DURATION:-8760h}
runtime_owner=${APOLLO_RUNTIME_OWNER:-65532:65532}

cluster() { kubectl config view --minify --raw -o "jsonpath={.clusters[0].cluster.$1}"; }
server=$(cluster server)
ca=$(cluster certificate-authority-data)
tls_server_name=$(cluster tls-server-name)
if [ -z "$server" ] || [ -z "$ca" ]; then
    echo "tokens: \$KUBECONFIG names no server with certificate-authority-data" >&2
    exit 1
fi

umask 077
for account in $accounts; do
    case $account in
        "" | *[!a-z0-9.-]*)
            echo "tokens: '$account' is not a ServiceAccount name" >&2
            exit 1
            ;;
    esac
    token=$(kubectl --namespace "$namespace" create token "$account" --duration "$duration")
    dir="$identity_dir/$account"
    mkdir -p "$dir"
    {
        printf 'apiVersion: v1\nkind: Config\nclusters:\n- name: apollo\n  cluster:\n'
        printf '    server: %s\n    certificate-authority-data: %s\n' "$server" "$ca"
        if [ -n "$tls_server_name" ]; then
            printf '    tls-server-name: %s\n' "$tls_server_name"
        fi
        printf 'users:\n- name: %s\n  user:\n    token: %s\n' "$account" "$token"
        printf 'contexts:\n- name: apollo\n  context:\n    cluster: apollo\n    user: %s\n' "$account"
        printf '    namespace: %s\ncurrent-context: apollo\n' "$namespace"
    } >"$dir/kubeconfig.new"
    # The token is what the apiserver sees: check it before any component relies on it.
    who=$(kubectl --kubeconfig "$dir/kubeconfig.new" auth whoami -o "jsonpath={.status.userInfo.username}")
    if [ "$who" != "system:serviceaccount:$namespace:$account" ]; then
        echo "tokens: the token of $account authenticates as '$who'" >&2
        exit 1
    fi
    mv "$dir/kubeconfig.new" "$dir/kubeconfig"
    if [ "$(id -u)" = 0 ]; then
        chown -R "$runtime_owner" "$dir"
    fi
    echo "tokens: $dir/kubeconfig authenticates as $who"
done
