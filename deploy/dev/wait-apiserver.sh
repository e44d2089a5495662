#!/bin/sh
# docker-compose.yaml's `apiserver-ready` step: waits until kube-apiserver answers /readyz (its
# image has no shell or HTTP client for a healthcheck), at most APOLLO_WAIT_SECONDS (default 120).
# Runs in the apollo image (it carries kubectl) with the admin kubeconfig ($KUBECONFIG).
set -eu

deadline=${APOLLO_WAIT_SECONDS:-120}
waited=0
until kubectl get --raw=/readyz --request-timeout=2s >/dev/null 2>&1; do
    if [ "$waited" -ge "$deadline" ]; then
        echo "apiserver-ready: kube-apiserver not ready after ${deadline} s:" >&2
        kubectl get --raw='/readyz?verbose' --request-timeout=2s >&2 || true
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done
echo "apiserver-ready: kube-apiserver is ready"
