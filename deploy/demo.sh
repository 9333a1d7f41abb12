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

./bin/easguard run 2>"$log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true; echo; echo "easguard stopped"' EXIT INT TERM

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
easguard is running for organisation "$EASGUARD_ORG" (pid $pid).

  readiness     http://$EASGUARD_HTTP_ADDR/readyz
  metrics       http://$EASGUARD_HTTP_ADDR/metrics
  NATS          nats://$EASGUARD_NATS_LISTEN   (streams EASGUARD_*, bucket easguard_leases)
  NATS monitor  http://$EASGUARD_NATS_MONITOR_LISTEN/jsz?streams=true
  logs          $log   (JSON, one line per event)

What runs today: the platform every worker stands on — the embedded
JetStream server with all streams and buckets provisioned, the dead-letter
mover, health and metrics. The Exchange simulator, the MDM sources and the
five pipeline workers are not built yet, so no phone walks through the flow
in this demo; see the open issues.

Press Ctrl-C to stop.
TXT
wait "$pid"
