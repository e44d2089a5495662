#!/bin/sh
# One-shot setup of docker-compose.yaml's shared volumes; runs as root in the apollo image, before
# anything else starts:
# - the device HMAC key the gateways check tokens with (created once, kept across restarts, so
#   agents and gateways always agree);
# - each agent's token: lowercase hex HMAC-SHA256(key, deviceName), the key being the key file's
#   bytes (apollo_protocol::token). Agents only accept a token, never the key, so it is computed
#   here with the openssl CLI that ca-certificates already brings into the image;
# - a kubeconfig directory that kubesim (uid 65532) can write, without a stale kubeconfig in it
#   (consumers wait for the file to appear, so an old one must not satisfy them).
set -eu

secrets_dir=${APOLLO_SECRETS_DIR:-/var/lib/apollo/secrets}
kube_dir=${APOLLO_KUBE_DIR:-/var/lib/apollo/kube}
runtime_owner=${APOLLO_RUNTIME_OWNER:-65532:65532}
devices=${APOLLO_DEVICES:?set APOLLO_DEVICES to the agents device names, separated by spaces}

umask 077
mkdir -p "$secrets_dir/tokens" "$kube_dir"
rm -f "$kube_dir/config"

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

if [ "$(id -u)" = 0 ]; then
    chown -R "$runtime_owner" "$secrets_dir" "$kube_dir"
fi
# The kubeconfig holds no credentials (kubesim has no auth); the kubectl image runs as another user.
chmod 0755 "$kube_dir"
