#!/usr/bin/env bash
# Writes the copies of deploy/prometheus/mailroom-rules.yaml that the install manifests carry,
# because kustomize and Helm each refuse files outside their own directory:
#   deploy/components/prometheus-rule/prometheusrule.yaml   the rules as a PrometheusRule's spec
#   deploy/helm/mailroom/files/prometheus/mailroom-rules.yaml   the file as it is
# `make prometheus-rule` runs it; tests/prometheus_rules.rs fails when a copy drifts.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
readonly SOURCE=deploy/prometheus/mailroom-rules.yaml
readonly COMPONENT=deploy/components/prometheus-rule/prometheusrule.yaml
readonly CHART_COPY=deploy/helm/mailroom/files/prometheus/mailroom-rules.yaml

mkdir -p "$(dirname "$COMPONENT")" "$(dirname "$CHART_COPY")"
{
  printf '# Generated from %s by hack/prometheus-rule.sh (make prometheus-rule); edit that file.\n' "$SOURCE"
  printf 'apiVersion: monitoring.coreos.com/v1\n'
  printf 'kind: PrometheusRule\n'
  printf 'metadata:\n'
  printf '  name: mailroom\n'
  printf '  namespace: mailroom-system\n'
  printf '  labels:\n'
  printf '    app.kubernetes.io/name: mailroom\n'
  printf '    app.kubernetes.io/part-of: mailroom\n'
  printf '    app.kubernetes.io/component: alerting\n'
  printf 'spec:\n'
  # The rules from their first line on (the file's leading comments stay in the source).
  sed -n '/^groups:/,$p' "$SOURCE" | sed 's/^\(.\)/  \1/'
} >"$COMPONENT.tmp"
mv "$COMPONENT.tmp" "$COMPONENT"
cp "$SOURCE" "$CHART_COPY"
echo "==> wrote $COMPONENT and $CHART_COPY" >&2
