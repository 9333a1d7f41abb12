#!/usr/bin/env bash
# The local demo: easguard with every worker around an embedded NATS server,
# next to a simulated Exchange organisation (exchangesim) and a simulated
# SMTP relay (smtpsim). Once everything is up, bin/demowalk walks one new
# phone through the seed flow (quarantined, blocked, mailed, enrolled,
# allowed) and prints each event as it happens; then the demo stays up for
# you to look around until Ctrl-C.
#
#   make demo                      build, run, walk, stay up
#   deploy/demo.sh --check         walk once and exit: 0 when the phone got mail
#   DEMO_EXIT=1 make demo          the same through make
#
# Only bash and the binaries of `make build` are needed (no curl, no jq).
# Settings (environment):
#   EASGUARD_DATA_DIR             ./data/demo; wiped at every start
#   EASGUARD_HTTP_ADDR            127.0.0.1:9090 (/readyz, /metrics, /status, POST /sync)
#   EASGUARD_NATS_LISTEN          127.0.0.1:4222
#   EASGUARD_NATS_MONITOR_LISTEN  127.0.0.1:8222
#   BIN_DIR                       ./bin (easguard, exchangesim, smtpsim, demowalk)
#   DEMO_QUICK_INTERVAL           5s (how often the collector looks for new phones)
#   DEMO_STEP_TIMEOUT             60s (the walk fails when one of its steps takes longer)
set -euo pipefail
cd "$(dirname "$0")/.."

check=0
case "${1:-}" in
--check) check=1 ;;
"") ;;
*)
	echo "usage: deploy/demo.sh [--check]" >&2
	exit 2
	;;
esac
case "${DEMO_EXIT:-}" in
"" | 0 | false | no) ;;
*) check=1 ;;
esac

bin=${BIN_DIR:-./bin}
for b in easguard exchangesim smtpsim demowalk; do
	[ -x "$bin/$b" ] || {
		echo "demo: $bin/$b is missing; run make build (or make demo)" >&2
		exit 1
	}
done

# The demo configures its easguard itself: other EASGUARD_ settings of the
# shell (a NATS URL, a policy, a dry run, …) would change what it shows.
for v in $(compgen -v EASGUARD_); do
	case $v in
	EASGUARD_ORG | EASGUARD_DATA_DIR | EASGUARD_HTTP_ADDR | EASGUARD_NATS_LISTEN | EASGUARD_NATS_MONITOR_LISTEN | EASGUARD_LOG_LEVEL) ;;
	*)
		echo "demo: ignoring $v of your shell" >&2
		unset "$v"
		;;
	esac
done
export EASGUARD_ORG="${EASGUARD_ORG:-contoso}"
export EASGUARD_HTTP_ADDR="${EASGUARD_HTTP_ADDR:-127.0.0.1:9090}"
export EASGUARD_NATS_LISTEN="${EASGUARD_NATS_LISTEN:-127.0.0.1:4222}"
export EASGUARD_NATS_MONITOR_LISTEN="${EASGUARD_NATS_MONITOR_LISTEN:-127.0.0.1:8222}"
quick=${DEMO_QUICK_INTERVAL:-5s}
domain=contoso.com
mailbox=demo.user

# in_use tells whether something already listens on host:port, over bash's
# /dev/tcp.
in_use() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }
for a in "$EASGUARD_HTTP_ADDR" "$EASGUARD_NATS_LISTEN" "$EASGUARD_NATS_MONITOR_LISTEN"; do
	if in_use "$a"; then
		echo "demo: $a is in use (is another demo still running?); stop it, or set EASGUARD_HTTP_ADDR, EASGUARD_NATS_LISTEN and EASGUARD_NATS_MONITOR_LISTEN to free ports" >&2
		exit 1
	fi
done

# The data directory is wiped so that every demo starts fresh, but only if
# it is one a demo made (or the default one).
data=${EASGUARD_DATA_DIR:-./data/demo}
if [ -e "$data" ] && [ ! -d "$data" ]; then
	echo "demo: EASGUARD_DATA_DIR $data is not a directory" >&2
	exit 1
fi
if [ -d "$data" ] && [ ! -e "$data/.easguard-demo" ] && [ "$data" != ./data/demo ] && [ -n "$(ls -A "$data")" ]; then
	echo "demo: refusing to wipe $data: it is not a demo data directory (no .easguard-demo in it)" >&2
	exit 1
fi
rm -rf "$data"
mkdir -p "$data"
touch "$data/.easguard-demo"
data=$(cd "$data" && pwd)
export EASGUARD_DATA_DIR="$data"

pids=()
# cleanup stops what the demo started (it runs as the EXIT trap).
# shellcheck disable=SC2317
cleanup() {
	local code=$?
	trap - EXIT INT TERM
	if [ ${#pids[@]} -gt 0 ]; then
		kill -TERM "${pids[@]}" 2>/dev/null || true
		wait "${pids[@]}" 2>/dev/null || true
		echo "demo: easguard, exchangesim and smtpsim stopped (logs and data: $data)"
	fi
	exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# fail prints why the demo stops and the end of every log, then exits.
fail() {
	echo >&2
	echo "demo: $*" >&2
	local f
	for f in "$data"/*.log; do
		[ -s "$f" ] || continue
		echo "--- last lines of $f" >&2
		tail -n 25 "$f" >&2
	done
	exit 1
}

# started waits until a simulator has printed its JSON line to file.
started() {
	local file=$1 pid=$2 name=$3
	for _ in $(seq 1 300); do
		grep -q '^{.*}$' "$file" 2>/dev/null && return 0
		kill -0 "$pid" 2>/dev/null || fail "$name exited during start"
		sleep 0.1
	done
	fail "$name did not start within 30 s"
}

# field prints a string field of a one-line JSON document.
field() { sed -n "s/.*\"$2\":\"\([^\"]*\)\".*/\1/p" "$1"; }

# ready asks easguard's /readyz.
ready() {
	local status
	{ exec 3<>"/dev/tcp/${EASGUARD_HTTP_ADDR%:*}/${EASGUARD_HTTP_ADDR##*:}"; } 2>/dev/null || return 1
	printf 'GET /readyz HTTP/1.0\r\nHost: %s\r\n\r\n' "$EASGUARD_HTTP_ADDR" >&3
	read -r _ status _ <&3 || true
	exec 3<&- 3>&-
	[ "$status" = 200 ]
}

echo "== starting the demo in $data"

# Exchange: two Client Access servers over HTTPS with a self-signed
# certificate, a seeded organisation, Exchange's realistic latency, and
# Exchange's own default (DefaultAccessLevel Allow) until easguard's first
# full sync enforces Quarantine.
"$bin"/exchangesim -mailboxes 200 -partnerships 300 -domain "$domain" -https -cert-out "$data/exchange-ca.pem" \
	-env-out "$data/exchange.env" >"$data/exchangesim.json" 2>"$data/exchangesim.log" &
pids+=($!)
started "$data/exchangesim.json" "${pids[-1]}" exchangesim
admin=$(field "$data/exchangesim.json" admin)
echo "   exchangesim   $admin (admin API), $(sed -n 's/.*"mailboxes":\([0-9]*\).*"partnerships":\([0-9]*\).*/\1 mailboxes, \2 phones/p' "$data/exchangesim.json")"

# SMTP: a relay that requires STARTTLS and a login, and keeps every mail.
smtp_password=demo-smtp-password
SMTPSIM_PASSWORD=$smtp_password "$bin"/smtpsim -user easguard -require-tls -cert-out "$data/smtp-ca.pem" \
	>"$data/smtpsim.json" 2>"$data/smtpsim.log" &
pids+=($!)
started "$data/smtpsim.json" "${pids[-1]}" smtpsim
smtp=$(field "$data/smtpsim.json" smtp)
mailapi=$(field "$data/smtpsim.json" api)
echo "   smtpsim       smtp://$smtp (STARTTLS, login), mails at $mailapi"

# The Exchange connection, as the simulator wrote it (the password may hold
# any character, so the file is read, not sourced).
while IFS='=' read -r key value; do
	[ -n "$key" ] && export "$key=$value"
done <"$data/exchange.env"

# The MDM inventory: what an export job from Intune would write. It starts
# with one enrolled phone of a colleague, because an empty inventory raises
# an alert (an MDM export that came out empty must not block anyone).
inventory=$data/inventory.json
cat >"$inventory" <<JSON
[
  {"id": "intune-colleague-0001", "userPrincipalName": "demo.colleague@$domain", "easDeviceId": "ApplCOLLEAGUE001",
   "complianceState": "compliant", "managementState": "managed", "operatingSystem": "iOS", "osVersion": "17.4",
   "model": "iPhone 15", "lastSyncDateTime": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
]
JSON

# The policy: a pilot. The simulated organisation has hundreds of phones
# that no MDM knows; with everyone in scope easguard would block them all,
# or rather its blast-radius guard would refuse to and raise an alert.
policy=$data/policy.yaml
cat >"$policy" <<YAML
# The demo's policy; every key is described in pkg/policy/doc.go.
version: 1
org: $EASGUARD_ORG
# A pilot: easguard manages the demo users' phones and never touches anyone
# else's. To widen it, add mailboxes, domains or groups to include (an empty
# include means every mailbox), e.g.  include: {domains: [$domain]}
# easguard re-reads this file when it changes; POST /sync?kind=full then
# judges every phone again.
scope:
  include: {mailboxes: ["demo.*@$domain"]}
unknown_device: block
noncompliant: block
allowed_platforms: [ios, ipados, android]
platform_not_allowed: block
notify: true
YAML

export EASGUARD_LOG_LEVEL="${EASGUARD_LOG_LEVEL:-info}"
export EASGUARD_SHUTDOWN_TIMEOUT=10s
export EASGUARD_COLLECTOR_QUICK_INTERVAL=$quick
export EASGUARD_EVALUATOR_POLICY_FILE=$policy
export EASGUARD_MDM_FILE=$inventory
export EASGUARD_MAILER_SMTP_HOST=${smtp%:*}
export EASGUARD_MAILER_SMTP_PORT=${smtp##*:}
export EASGUARD_MAILER_SMTP_SECURITY=starttls
export EASGUARD_MAILER_SMTP_USER=easguard
export EASGUARD_MAILER_SMTP_PASSWORD=$smtp_password
export EASGUARD_MAILER_SMTP_CA_BUNDLE=$data/smtp-ca.pem
export EASGUARD_MAILER_FROM="IT Service <it@$domain>"
export EASGUARD_MAILER_ENROL_URL="https://portal.manage.microsoft.com/enrol?org=$EASGUARD_ORG"
export EASGUARD_MAILER_HELPDESK="helpdesk@$domain, +49 30 1234"
export EASGUARD_MAILER_COMPANY=Contoso

"$bin"/easguard run 2>"$data/easguard.log" &
pids+=($!)
easguard_pid=${pids[-1]}
for _ in $(seq 1 300); do
	kill -0 "$easguard_pid" 2>/dev/null || fail "easguard exited during start"
	ready && break
	sleep 0.1
done
ready || fail "easguard did not become ready within 30 s"
echo "   easguard      http://$EASGUARD_HTTP_ADDR, NATS nats://$EASGUARD_NATS_LISTEN, quick sync every $quick"
echo

walk=("$bin"/demowalk -org "$EASGUARD_ORG" -nats "nats://$EASGUARD_NATS_LISTEN" -easguard "http://$EASGUARD_HTTP_ADDR"
	-exchange "$admin" -smtp "$mailapi" -inventory "$inventory" -enrol-url "$EASGUARD_MAILER_ENROL_URL"
	-step-timeout "${DEMO_STEP_TIMEOUT:-60s}")
"${walk[@]}" -mailbox "$mailbox@$domain" || fail "the walk failed (see above)"

if [ "$check" = 1 ]; then
	echo
	echo "demo: the walk passed (--check); stopping"
	exit 0
fi

cat <<TXT

easguard is running for organisation "$EASGUARD_ORG" with every worker (pid $easguard_pid),
next to the simulated Exchange and SMTP servers. Look around:

  status        http://$EASGUARD_HTTP_ADDR/status    (last syncs, the guard, the policy, the MDM file)
  sync now      curl -X POST 'http://$EASGUARD_HTTP_ADDR/sync?kind=quick'   (or kind=full)
  metrics       http://$EASGUARD_HTTP_ADDR/metrics
  NATS          nats://$EASGUARD_NATS_LISTEN   (nats sub 'easguard.$EASGUARD_ORG.>' shows every event)
  NATS monitor  http://$EASGUARD_NATS_MONITOR_LISTEN/jsz?streams=true
  mails         $mailapi/   (JSON: $mailapi/api/messages)
  Exchange      $admin/api/org , $admin/api/partnerships?mailbox=$mailbox
                a new phone syncs (run it again to see its state change):
                curl -d '{"mailbox":"$mailbox@$domain","device_id":"ApplMYPHONE0001","device_type":"iPhone"}' $admin/api/phones/sync
  inventory     $inventory   (the MDM export; re-read when it changes)
                to let ApplMYPHONE0001 in, add a record like the walk's with that easDeviceId
                (write a copy next to it, then mv the copy over the file)
  policy        $policy
                a pilot: only demo.*@$domain is managed. With include: {domains: [$domain]}
                and POST /sync?kind=full, easguard would block the ~300 phones no MDM knows;
                its blast-radius guard refuses that and raises an alert instead
  walk again    another phone of another demo user, against this demo:
                $bin/demowalk -mailbox demo.someone@$domain -exchange $admin -smtp $mailapi \\
                  -nats nats://$EASGUARD_NATS_LISTEN -easguard http://$EASGUARD_HTTP_ADDR -inventory $(printf %q "$inventory")
  logs          $data/*.log   (easguard's: JSON, one line per event)

Press Ctrl-C to stop.
TXT
wait "$easguard_pid" || true
fail "easguard exited by itself"
