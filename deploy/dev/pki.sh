#!/bin/sh
# The compose stack's control-plane certificates, as scripts/control-plane.sh makes them for the
# tests (ECDSA P-256, one CA, openssl CLI); run by init.sh. Created once and kept for the same
# server name (etcd keeps its data across `docker compose up`, and with it what the keys signed).
#
#   APOLLO_PKI_DIR        ca.crt/.key; apiserver.crt/.key (serving: the host of APOLLO_APISERVER_URL,
#                         localhost, 127.0.0.1 and the in-cluster names); admin.crt/.key (CN
#                         apollo-admin, O system:masters); controller-manager.crt/.key (CN
#                         system:kube-controller-manager); sa.key/sa.pub (service-account tokens);
#                         controller-manager.kubeconfig
#   APOLLO_ADMIN_DIR      kubeconfig: the admin's, for the kubectl steps only
#   APOLLO_APISERVER_URL  the server both kubeconfigs name, e.g. https://kube-apiserver:6443
set -eu

pki=${APOLLO_PKI_DIR:?set APOLLO_PKI_DIR}
admin_dir=${APOLLO_ADMIN_DIR:?set APOLLO_ADMIN_DIR}
url=${APOLLO_APISERVER_URL:?set APOLLO_APISERVER_URL, e.g. https://kube-apiserver:6443}

host=${url#https://}
host=${host%%/*}
host=${host%:*}
case $host in
    "" | *[!a-z0-9.-]*)
        echo "pki: APOLLO_APISERVER_URL must be https://<DNS name>:<port>, not $url" >&2
        exit 1
        ;;
esac

umask 077
mkdir -p "$pki" "$admin_dir"

gen_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# sign <name> <subject> <extension lines...>: $pki/<name>.key and .crt, signed by the CA.
sign() {
    name=$1 subject=$2
    shift 2
    gen_key "$pki/$name.key"
    openssl req -new -key "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr" 2>/dev/null
    printf '%s\n' "$@" >"$pki/$name.ext"
    openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
        -days 3650 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
    rm -f "$pki/$name.csr" "$pki/$name.ext"
}

if [ "$(cat "$pki/.complete" 2>/dev/null || true)" != "$host" ]; then
    find "$pki" -mindepth 1 -delete
    gen_key "$pki/ca.key"
    openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=apollo-compose-ca" -days 3650 -sha256 \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$pki/ca.crt" 2>/dev/null
    sign apiserver "/CN=kube-apiserver" \
        "subjectAltName=DNS:$host,DNS:localhost,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.0.0.1" \
        "extendedKeyUsage=serverAuth" "keyUsage=critical,digitalSignature,keyEncipherment"
    sign admin "/O=system:masters/CN=apollo-admin" \
        "extendedKeyUsage=clientAuth" "keyUsage=critical,digitalSignature,keyEncipherment"
    sign controller-manager "/CN=system:kube-controller-manager" \
        "extendedKeyUsage=clientAuth" "keyUsage=critical,digitalSignature,keyEncipherment"
    gen_key "$pki/sa.key"
    openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    rm -f "$pki/ca.srl"
    echo "$host" >"$pki/.complete"
    echo "pki: wrote a new CA and certificates for $host"
fi

b64() { base64 <"$1" | tr -d '\n'; }

# kubeconfig <file> <user> <certificate name>: client-certificate kubeconfig for $url.
kubeconfig() {
    cat >"$1.new" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: apollo
  cluster:
    server: $url
    certificate-authority-data: $(b64 "$pki/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(b64 "$pki/$3.crt")
    client-key-data: $(b64 "$pki/$3.key")
contexts:
- name: apollo
  context:
    cluster: apollo
    user: $2
    namespace: default
current-context: apollo
EOF
    mv "$1.new" "$1"
}

kubeconfig "$admin_dir/kubeconfig" apollo-admin admin
kubeconfig "$pki/controller-manager.kubeconfig" system:kube-controller-manager controller-manager
echo "pki: kubeconfigs for $url"
