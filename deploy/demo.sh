#!/usr/bin/env bash
# The local demo: easguard with an embedded NATS server on this machine.
# `make demo` runs it after `make build`. Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

export EASGUARD_ORG="${EASGUARD_ORG:-contoso}"
export EASGUARD_DATA_DIR="${EASGUARD_DATA_DIR:-./data/demo}"
export EASGUARD_HTTP_ADDR="${EASGUARD_HTTP_ADDR:-127.0.0.1:9090}"
export EASGUARD_NATS_LISTEN="${EASGUARD_NATS_LISTEN:-127.0.0.1:4222}"
export EASGUARD_NATS_MONITOR_LISTEN="${EASGUARD_NATS_MONITOR_LISTEN:-127.0.0.1:8222}"
log="${EASGUARD_DATA_DIR}/easguard.log"
mkdir -p "$EASGUARD_DATA_DIR"

# ready asks /readyz over bash's /dev/tcp, so the demo needs no curl.
ready() {
	local host=${EASGUARD_HTTP_ADDR%:*} port=${EASGUARD_HTTP_ADDR##*:} status
	{ exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null || return 1
	printf 'GET /readyz HTTP/1.0\r\nHost: %s\r\n\r\n' "$host" >&3
	read -r _ status _ <&3 || true
	exec 3<&- 3>&-
	[ "$status" = 200 ]
}

# The Exchange simulator: two Client Access servers over HTTPS with a
# self-signed certificate, a seeded organisation, the default latency profile.
simlog="${EASGUARD_DATA_DIR}/exchangesim.log"
./bin/exchangesim -mailboxes 1000 -partnerships 2000 -https -cert-out "$EASGUARD_DATA_DIR/exchange-ca.pem" \
	-env-out "$EASGUARD_DATA_DIR/exchange.env" >"$EASGUARD_DATA_DIR/exchangesim.json" 2>"$simlog" &
simpid=$!
EASGUARD_WORKERS=none ./bin/easguard run 2>"$log" &
pid=$!
trap 'kill -TERM $pid $simpid 2>/dev/null; wait $pid $simpid 2>/dev/null || true; echo; echo "easguard and exchangesim stopped"' EXIT INT TERM
for _ in $(seq 1 100); do
	[ -s "$EASGUARD_DATA_DIR/exchange.env" ] && break
	kill -0 "$simpid" 2>/dev/null || { echo "exchangesim exited during start; its log ($simlog):" >&2; cat "$simlog" >&2; exit 1; }
	sleep 0.1
done
set -a
# shellcheck disable=SC1091
. "$EASGUARD_DATA_DIR/exchange.env"
set +a
admin=$(sed -n 's/.*"admin":"\([^"]*\)".*/\1/p' "$EASGUARD_DATA_DIR/exchangesim.json")

echo "== easguard check exchange (against the simulator) =="
./bin/easguard check exchange || { echo "the Exchange check failed" >&2; exit 1; }
echo

for _ in $(seq 1 300); do
	if ! kill -0 "$pid" 2>/dev/null; then
		echo "easguard exited during start; its log ($log):" >&2
		cat "$log" >&2
		exit 1
	fi
	if ready; then
		break
	fi
	sleep 0.1
done
ready || { echo "easguard did not become ready; log: $log" >&2; exit 1; }

cat <<TXT
easguard is running for organisation "$EASGUARD_ORG" (pid $pid), next to a
simulated Exchange organisation (exchangesim, pid $simpid).

  readiness     http://$EASGUARD_HTTP_ADDR/readyz
  metrics       http://$EASGUARD_HTTP_ADDR/metrics
  NATS          nats://$EASGUARD_NATS_LISTEN   (streams EASGUARD_*, bucket easguard_leases)
  NATS monitor  http://$EASGUARD_NATS_MONITOR_LISTEN/jsz?streams=true
  logs          $log   (JSON, one line per event)
  exchangesim   $admin/api/org , $admin/api/partnerships?mailbox=<alias>
                (sync a phone: curl -d '{"mailbox":"<alias>","device_id":"X","device_type":"iPhone"}' $admin/api/phones/sync)
  Exchange env  $EASGUARD_DATA_DIR/exchange.env (source it, then: bin/easguard check exchange)

What runs today: the platform every worker stands on (the embedded
JetStream server with all streams and buckets, the dead-letter mover,
health and metrics), the Exchange simulator, and easguard's Exchange access
(the check above went through its worker pool over WinRM). The MDM sources
and the five pipeline workers are not built yet, so no phone walks through
the flow in this demo; see the open issues.

Press Ctrl-C to stop.
TXT
wait "$pid"
