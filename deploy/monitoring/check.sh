#!/usr/bin/env bash
# Checks Apollo's alert rules with the real promtool (built from tools/prometheus, the Prometheus
# the local stack runs):
#   1. promtool check rules alerts.yaml        the rules parse, expressions are valid PromQL
#   2. promtool test rules alerts_test.yaml    every alert's unit tests
#   3. promtool check config prometheus.yaml   the compose scrape configuration (rules path local)
#   4. prometheusrule.yaml is alerts.yaml wrapped in a PrometheusRule, byte for byte
#
#   deploy/monitoring/check.sh           check (scripts/test.sh runs this)
#   deploy/monitoring/check.sh --write   regenerate prometheusrule.yaml from alerts.yaml first
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../../scripts/lib/go-tools.sh"

wrapped() {
  cat <<'HEAD'
# Generated from alerts.yaml by `deploy/monitoring/check.sh --write`: edit alerts.yaml, not this
# file (check.sh and tests/e2e/tests/monitoring.rs fail when the two differ).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: apollo
  namespace: apollo-system
  labels:
    app.kubernetes.io/part-of: apollo
    release: prometheus
spec:
HEAD
  # Indent every non-empty line by two: alerts.yaml's top-level `groups:` becomes spec.groups.
  sed -e 's/^\(.\)/  \1/' "$here/alerts.yaml"
}

if [ "${1:-}" = "--write" ]; then
  wrapped >"$here/prometheusrule.yaml"
  echo "wrote $here/prometheusrule.yaml"
fi

bin="$(prometheus_bin_dir)"
cd "$here"
"$bin/promtool" check rules alerts.yaml
"$bin/promtool" test rules alerts_test.yaml
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
sed "s#/etc/prometheus/alerts.yaml#$here/alerts.yaml#" prometheus.yaml >"$tmp/prometheus.yaml"
"$bin/promtool" check config "$tmp/prometheus.yaml"
if ! diff -u prometheusrule.yaml <(wrapped) >&2; then
  echo "error: deploy/monitoring/prometheusrule.yaml differs from alerts.yaml; run deploy/monitoring/check.sh --write" >&2
  exit 1
fi
echo "prometheusrule.yaml wraps alerts.yaml"
