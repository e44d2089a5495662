#!/bin/sh
# One-shot setup of docker-compose.yaml's shared volumes; runs as root in the apollo image, before
# anything else starts:
# - the device HMAC key the gateways check tokens with (created once, kept across restarts, so
#   agents and gateways always agree);
# - each agent's token: lowercase hex HMAC-SHA256(key, deviceName), the key being the key file's
#   bytes (apollo_protocol::token). Agents only accept a token, never the key, so it is computed
#   here with the openssl CLI that ca-certificates already brings into the image;
# - the control plane's certificates and kubeconfigs (pki.sh, next to this file: a CA, the
#   apiserver's serving certificate, the admin's and the controller-manager's client certificates,
#   the service-account signing key), created once and kept, as the HMAC key is;
# - the data directories of etcd and of the audit log, handed to the non-root control plane.
# Everything is handed to uid 65532 (the apollo image's user, which the control plane and the
# kubectl steps run as too); files are private to it.
set -eu

secrets_dir=${APOLLO_SECRETS_DIR:-/var/lib/apollo/secrets}
runtime_owner=${APOLLO_RUNTIME_OWNER:-65532:65532}
devices=${APOLLO_DEVICES:?set APOLLO_DEVICES to the agents device names, separated by spaces}
data_dirs=${APOLLO_DATA_DIRS:-}

umask 077
mkdir -p "$secrets_dir/tokens"

key_file="$secrets_dir/device-hmac.key"
if [ ! -s "$key_file" ]; then
    # 32 random bytes, hex: printable, so the same bytes work as a file and as an openssl argument.
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$key_file.new"
    mv "$key_file.new" "$key_file"
    echo "init: wrote a new device HMAC key"
fi
key=$(cat "$key_file")
case $key in
    "" | *[!0-9a-f]*)
        echo "init: $key_file must hold a lowercase hex key" >&2
        exit 1
        ;;
esac

for device in $devices; do
    case $device in
        "" | *[!a-z0-9.-]*)
            echo "init: device name '$device' is not a DNS-1123 name" >&2
            exit 1
            ;;
    esac
    printf '%s' "$device" | openssl dgst -sha256 -hmac "$key" -r | cut -d' ' -f1 \
        >"$secrets_dir/tokens/$device"
    echo "init: token for $device"
done

sh "$(dirname "$0")/pki.sh"

for dir in $data_dirs; do
    mkdir -p "$dir"
    chmod 0700 "$dir"
done

if [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2086
    chown -R "$runtime_owner" "$secrets_dir" "${APOLLO_PKI_DIR:?}" "${APOLLO_ADMIN_DIR:?}" $data_dirs
fi
