#!/usr/bin/env bash
# Check contrib/: the Prometheus alerting rules and the Grafana dashboard.
#   1. promtool check rules contrib/prometheus-alerts.yml
#   2. the dashboard is valid JSON, has a Prometheus data-source variable, and
#      every panel query parses as PromQL (promtool, after substituting the
#      Grafana variables);
#   3. both files use only the metric names outboxd exports, and every alert
#      has summary, description and runbook annotations;
#   4. promtool test rules: each alert fires on a synthetic failure and stays
#      quiet on healthy input (annotations are not compared).
# Installs promtool (Debian package prometheus) and PyYAML when absent.
# Exits non-zero on any failure. Called by `make test`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RULES="$ROOT/contrib/prometheus-alerts.yml"
DASH="$ROOT/contrib/grafana-dashboard.json"

if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v promtool >/dev/null 2>&1; then
    echo "check-contrib: promtool missing, installing prometheus" >&2
    apt_install prometheus
fi
PY=
for py in python3 /usr/bin/python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import yaml' 2>/dev/null; then PY=$py; break; fi
done
if [ -z "$PY" ]; then
    echo "check-contrib: PyYAML missing, installing python3-yaml" >&2
    apt_install python3 python3-yaml
    PY=/usr/bin/python3
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "check-contrib: promtool check rules"
promtool check rules "$RULES"

echo "check-contrib: dashboard JSON"
python3 -m json.tool "$DASH" >/dev/null

# Metric names, dashboard structure, annotations; writes the dashboard's
# queries as recording rules and an annotation-free copy of the alerts.
"$PY" - "$RULES" "$DASH" "$tmp" <<'PYEOF'
import json, re, sys, yaml

rules_path, dash_path, tmp = sys.argv[1:]
HIST = {"outboxd_http_request_duration_seconds", "outboxd_relay_batch_size",
        "outboxd_relay_apply_duration_seconds", "outboxd_relay_lag_seconds"}
PLAIN = {"outboxd_http_requests_total", "outboxd_ingest_duplicates_total",
         "outboxd_ingest_signature_failures_total",
         "outboxd_relay_rows_applied_total", "outboxd_relay_rows_retried_total",
         "outboxd_relay_rows_failed_total", "outboxd_relay_rows_stale_total",
         "outboxd_relay_pending_rows", "outboxd_relay_failed_rows",
         "outboxd_relay_listener_connected", "outboxd_relay_heartbeat_timestamp_seconds",
         "outboxd_notify_sent_total", "outboxd_notify_retried_total",
         "outboxd_notify_failed_total", "outboxd_notify_pending_rows",
         "outboxd_notify_failed_rows"}
KNOWN = PLAIN | {h + s for h in HIST for s in ("_bucket", "_sum", "_count")}
errors = []

def metric_names(expr):
    return set(re.findall(r"\boutboxd_[a-z0-9_]+\b", expr))

rules = yaml.safe_load(open(rules_path))
stripped = {"groups": []}
for g in rules["groups"]:
    sg = {"name": g["name"], "rules": []}
    for r in g["rules"]:
        name = r.get("alert") or r.get("record")
        for n in metric_names(r["expr"]) - KNOWN:
            errors.append(f"alert {name}: unknown metric {n}")
        if "alert" in r:
            ann = r.get("annotations") or {}
            for key in ("summary", "description", "runbook"):
                if not str(ann.get(key, "")).strip():
                    errors.append(f"alert {name}: no {key} annotation")
        sr = dict(r)
        sr.pop("annotations", None)
        sg["rules"].append(sr)
    stripped["groups"].append(sg)
yaml.safe_dump(stripped, open(f"{tmp}/alerts-noannotations.yml", "w"), sort_keys=False)

dash = json.load(open(dash_path))
variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
ds = [v for v in variables.values() if v.get("type") == "datasource" and v.get("query") == "prometheus"]
if not ds:
    errors.append("dashboard: no data-source variable of type prometheus")
ds_name = ds[0]["name"] if ds else "datasource"
record = []

def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))

for p in walk(dash.get("panels", [])):
    if p.get("type") == "row":
        continue
    uid = (p.get("datasource") or {}).get("uid")
    if uid != "${%s}" % ds_name:
        errors.append(f"panel {p.get('title')!r}: datasource uid {uid!r} is not ${{{ds_name}}}")
    for t in p.get("targets", []):
        expr = t.get("expr", "")
        for n in metric_names(expr) - KNOWN:
            errors.append(f"panel {p.get('title')!r}: unknown metric {n}")
        expr = (expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
                    .replace("$relay_id", ".*"))
        record.append({"record": f"dashboard:panel{p.get('id')}:{t.get('refId', 'A')}", "expr": expr})
if not record:
    errors.append("dashboard: no queries")
yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": record}]},
               open(f"{tmp}/dashboard-queries.yml", "w"), sort_keys=False)

for e in errors:
    print("check-contrib: FAIL", e, file=sys.stderr)
sys.exit(1 if errors else 0)
PYEOF

echo "check-contrib: dashboard queries parse"
promtool check rules "$tmp/dashboard-queries.yml"

echo "check-contrib: promtool test rules"
cat >"$tmp/alerts-test.yml" <<'EOF'
rule_files: [alerts-noannotations.yml]
evaluation_interval: 1m
tests:
  # Lag: p99 in the (5, 10] bucket -> fires after 5m; all under 1 s -> quiet.
  - interval: 1m
    input_series:
      - series: 'outboxd_relay_lag_seconds_bucket{job="outboxd-relay",relay_id="a",le="1"}'
        values: '0+0x30'
      - series: 'outboxd_relay_lag_seconds_bucket{job="outboxd-relay",relay_id="a",le="5"}'
        values: '0+0x30'
      - series: 'outboxd_relay_lag_seconds_bucket{job="outboxd-relay",relay_id="a",le="10"}'
        values: '0+60x30'
      - series: 'outboxd_relay_lag_seconds_bucket{job="outboxd-relay",relay_id="a",le="+Inf"}'
        values: '0+60x30'
      - series: 'outboxd_relay_lag_seconds_bucket{job="ok-relay",relay_id="b",le="1"}'
        values: '0+60x30'
      - series: 'outboxd_relay_lag_seconds_bucket{job="ok-relay",relay_id="b",le="+Inf"}'
        values: '0+60x30'
    alert_rule_test:
      - eval_time: 3m
        alertname: OutboxdRelayLagHigh
        exp_alerts: []
      - eval_time: 15m
        alertname: OutboxdRelayLagHigh
        exp_alerts:
          - exp_labels: {severity: warning, job: outboxd-relay}

  # Stalled: pending rows and no progress -> fires; progress -> quiet.
  - interval: 1m
    input_series:
      - series: 'outboxd_relay_pending_rows{job="outboxd-relay",relay_id="a"}'
        values: '10x30'
      - series: 'outboxd_relay_rows_applied_total{job="outboxd-relay",relay_id="a"}'
        values: '5x30'
      - series: 'outboxd_relay_rows_retried_total{job="outboxd-relay",relay_id="a"}'
        values: '0x30'
      - series: 'outboxd_relay_pending_rows{job="busy-relay",relay_id="b"}'
        values: '10x30'
      - series: 'outboxd_relay_rows_applied_total{job="busy-relay",relay_id="b"}'
        values: '0+10x30'
    alert_rule_test:
      - eval_time: 20m
        alertname: OutboxdRelayStalled
        exp_alerts:
          - exp_labels: {severity: critical, job: outboxd-relay}

  # Failed rows.
  - interval: 1m
    input_series:
      - series: 'outboxd_relay_failed_rows{job="outboxd-relay",relay_id="a"}'
        values: '0 0 0 3x10'
      - series: 'outboxd_relay_failed_rows{job="outboxd-relay",relay_id="b"}'
        values: '0 0 0 3x10'
    alert_rule_test:
      - eval_time: 2m
        alertname: OutboxdFailedRows
        exp_alerts: []
      - eval_time: 6m
        alertname: OutboxdFailedRows
        exp_alerts:
          - exp_labels: {severity: warning, job: outboxd-relay}

  # Notifications owed but none sent (SMTP down), then sent again.
  - interval: 1m
    input_series:
      - series: 'outboxd_notify_pending_rows{job="outboxd-relay",relay_id="a"}'
        values: '5x60'
      - series: 'outboxd_notify_sent_total{job="outboxd-relay",relay_id="a"}'
        values: '0+1x10 10x50'
    alert_rule_test:
      - eval_time: 10m
        alertname: OutboxdNotificationBacklog
        exp_alerts: []
      - eval_time: 40m
        alertname: OutboxdNotificationBacklog
        exp_alerts:
          - exp_labels: {severity: warning, job: outboxd-relay}

  # Failed notifications.
  - interval: 1m
    input_series:
      - series: 'outboxd_notify_failed_rows{job="outboxd-relay",relay_id="a"}'
        values: '0 0 0 2x10'
    alert_rule_test:
      - eval_time: 2m
        alertname: OutboxdNotificationsFailed
        exp_alerts: []
      - eval_time: 6m
        alertname: OutboxdNotificationsFailed
        exp_alerts:
          - exp_labels: {severity: warning, job: outboxd-relay}

  # No relay at all: neither up nor heartbeat.
  - interval: 1m
    input_series:
      - series: 'up{job="outboxd-ingest",instance="i:8080"}'
        values: '1x10'
    alert_rule_test:
      - eval_time: 5m
        alertname: OutboxdNoRelayAlive
        exp_alerts:
          - exp_labels: {severity: critical}

  # Relays scraped but every main loop stuck (heartbeat frozen at t=0).
  - interval: 1m
    input_series:
      - series: 'up{job="outboxd-relay",instance="r:9188"}'
        values: '1x10'
      - series: 'outboxd_relay_heartbeat_timestamp_seconds{job="outboxd-relay",instance="r:9188",relay_id="a"}'
        values: '0x10'
    alert_rule_test:
      - eval_time: 2m
        alertname: OutboxdNoRelayAlive
        exp_alerts: []
      - eval_time: 6m
        alertname: OutboxdNoRelayAlive
        exp_alerts:
          - exp_labels: {severity: critical}
      - eval_time: 6m
        alertname: OutboxdRelayHeartbeatStale
        exp_alerts:
          - exp_labels: {severity: warning, job: outboxd-relay, instance: "r:9188", relay_id: a}

  # Healthy: one relay up with a fresh heartbeat (value = scrape time), one stuck.
  - interval: 1m
    input_series:
      - series: 'up{job="outboxd-relay",instance="r:9188"}'
        values: '1x10'
      - series: 'up{job="outboxd-relay",instance="s:9188"}'
        values: '1x10'
      - series: 'outboxd_relay_heartbeat_timestamp_seconds{job="outboxd-relay",instance="r:9188",relay_id="a"}'
        values: '0+60x10'
      - series: 'outboxd_relay_heartbeat_timestamp_seconds{job="outboxd-relay",instance="s:9188",relay_id="b"}'
        values: '0x10'
      - series: 'outboxd_relay_listener_connected{job="outboxd-relay",instance="r:9188",relay_id="a"}'
        values: '1 1 0x8'
      - series: 'outboxd_relay_listener_connected{job="outboxd-relay",instance="s:9188",relay_id="b"}'
        values: '1x10'
    alert_rule_test:
      - eval_time: 8m
        alertname: OutboxdNoRelayAlive
        exp_alerts: []
      - eval_time: 8m
        alertname: OutboxdRelayHeartbeatStale
        exp_alerts:
          - exp_labels: {severity: warning, job: outboxd-relay, instance: "s:9188", relay_id: b}
      - eval_time: 3m
        alertname: OutboxdRelayListenerDown
        exp_alerts: []
      - eval_time: 5m
        alertname: OutboxdRelayListenerDown
        exp_alerts:
          - exp_labels: {severity: warning, job: outboxd-relay, instance: "r:9188", relay_id: a}

  # Ingest: 20 of 120 requests per minute answer 503 -> fires; 1 of 101 -> quiet.
  - interval: 1m
    input_series:
      - series: 'outboxd_http_requests_total{job="outboxd-ingest",instance="i:8080",route="/webhooks/email",status="202"}'
        values: '0+100x20'
      - series: 'outboxd_http_requests_total{job="outboxd-ingest",instance="i:8080",route="/webhooks/email",status="503"}'
        values: '0+20x20'
      - series: 'outboxd_http_requests_total{job="ok-ingest",instance="j:8080",route="/webhooks/email",status="202"}'
        values: '0+100x20'
      - series: 'outboxd_http_requests_total{job="ok-ingest",instance="j:8080",route="/webhooks/email",status="503"}'
        values: '0+1x20'
      - series: 'up{job="outboxd-ingest",instance="i:8080"}'
        values: '1 1 0x18'
      - series: 'outboxd_ingest_signature_failures_total{job="outboxd-ingest",instance="i:8080"}'
        values: '0+60x40'
    alert_rule_test:
      - eval_time: 3m
        alertname: OutboxdIngest5xx
        exp_alerts: []
      - eval_time: 10m
        alertname: OutboxdIngest5xx
        exp_alerts:
          - exp_labels: {severity: critical, job: outboxd-ingest}
      - eval_time: 6m
        alertname: OutboxdIngestDown
        exp_alerts:
          - exp_labels: {severity: critical, job: outboxd-ingest, instance: "i:8080"}
      - eval_time: 10m
        alertname: OutboxdIngestSignatureFailures
        exp_alerts: []
      - eval_time: 20m
        alertname: OutboxdIngestSignatureFailures
        exp_alerts:
          - exp_labels: {severity: warning, job: outboxd-ingest}
EOF
(cd "$tmp" && promtool test rules alerts-test.yml)

echo "check-contrib: ok"
