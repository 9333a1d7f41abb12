#!/usr/bin/env bash
# The local demo: easguard with every worker around an embedded NATS server,
# next to a simulated Exchange organisation (exchangesim), a simulated
# Intune tenant that easguard reads through Microsoft Graph (intunesim; it
# knows most of exchangesim's phones) and a simulated SMTP relay (smtpsim).
# Once everything is up, bin/demowalk walks one new phone through the seed
# flow (quarantined, blocked, mailed, enrolled in Intune, allowed) and
# prints each event as it happens; then the demo stays up for you to look
# around until Ctrl-C.
#
#   make demo                      build, run, walk, stay up
#   deploy/demo.sh --check         walk once and exit: 0 when the phone got mail
#   DEMO_EXIT=1 make demo          the same through make
#   DEMO_MDM=file make demo        an MDM inventory file instead of Intune
#
# Only bash and the binaries of `make build` are needed (no curl, no jq).
# Settings (environment):
#   DEMO_MDM                      graph (Intune through Graph, intunesim) or file (an inventory file)
#   EASGUARD_DATA_DIR             ./data/demo; wiped at every start
#   EASGUARD_HTTP_ADDR            127.0.0.1:9090 (/healthz, /readyz, /metrics)
#   EASGUARD_CONSOLE_ADDR         127.0.0.1:8443 (the console and its API, behind sign-in)
#   EASGUARD_NATS_LISTEN          127.0.0.1:4222
#   EASGUARD_NATS_MONITOR_LISTEN  127.0.0.1:8222
#   DEMO_INTUNESIM_ADDR           127.0.0.1:9443 (intunesim's Entra ID and Graph, HTTPS)
#   DEMO_INTUNESIM_ADMIN          127.0.0.1:9091 (intunesim's admin API, HTTP)
#   BIN_DIR                       ./bin (easguard, exchangesim, intunesim, smtpsim, demowalk)
#   DEMO_QUICK_INTERVAL           5s (how often the collector looks for new phones)
#   DEMO_GRAPH_POLL_INTERVAL      2s (how often easguard reads Intune; production default 2m)
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

mdm=${DEMO_MDM:-graph}
case $mdm in
graph | file) ;;
*)
	echo "demo: DEMO_MDM is graph (Intune through Microsoft Graph, the default) or file (an inventory file), not $mdm" >&2
	exit 2
	;;
esac

bin=${BIN_DIR:-./bin}
needed=(easguard exchangesim smtpsim demowalk)
[ "$mdm" = graph ] && needed+=(intunesim)
for b in "${needed[@]}"; do
	[ -x "$bin/$b" ] || {
		echo "demo: $bin/$b is missing; run make build (or make demo)" >&2
		exit 1
	}
done

# The demo configures its easguard itself: other EASGUARD_ settings of the
# shell (a NATS URL, a policy, a dry run, …) would change what it shows.
for v in $(compgen -v EASGUARD_); do
	case $v in
	EASGUARD_ORG | EASGUARD_DATA_DIR | EASGUARD_HTTP_ADDR | EASGUARD_CONSOLE_ADDR | EASGUARD_NATS_LISTEN | EASGUARD_NATS_MONITOR_LISTEN | EASGUARD_LOG_LEVEL) ;;
	*)
		echo "demo: ignoring $v of your shell" >&2
		unset "$v"
		;;
	esac
done
export EASGUARD_ORG="${EASGUARD_ORG:-contoso}"
export EASGUARD_HTTP_ADDR="${EASGUARD_HTTP_ADDR:-127.0.0.1:9090}"
export EASGUARD_CONSOLE_ADDR="${EASGUARD_CONSOLE_ADDR:-127.0.0.1:8443}"
export EASGUARD_NATS_LISTEN="${EASGUARD_NATS_LISTEN:-127.0.0.1:4222}"
export EASGUARD_NATS_MONITOR_LISTEN="${EASGUARD_NATS_MONITOR_LISTEN:-127.0.0.1:8222}"
DEMO_INTUNESIM_ADDR="${DEMO_INTUNESIM_ADDR:-127.0.0.1:9443}"
DEMO_INTUNESIM_ADMIN="${DEMO_INTUNESIM_ADMIN:-127.0.0.1:9091}"
quick=${DEMO_QUICK_INTERVAL:-5s}
graph_poll=${DEMO_GRAPH_POLL_INTERVAL:-2s}
domain=contoso.com
mailbox=demo.user
# The simulated organisation; exchangesim and intunesim build the same one
# from these, so that Intune knows (most of) Exchange's phones.
orgspec=(-seed 1 -mailboxes 200 -partnerships 300 -domain "$domain")
# The walk's phone (an id of its own per run).
device=$(printf 'ApplDEMO%08X' "$(date +%s)")

# in_use tells whether something already listens on host:port, over bash's
# /dev/tcp.
in_use() { (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null; }
addrs=(EASGUARD_HTTP_ADDR EASGUARD_CONSOLE_ADDR EASGUARD_NATS_LISTEN EASGUARD_NATS_MONITOR_LISTEN)
[ "$mdm" = graph ] && addrs+=(DEMO_INTUNESIM_ADDR DEMO_INTUNESIM_ADMIN)
for v in "${addrs[@]}"; do
	if in_use "${!v}"; then
		echo "demo: ${!v} ($v) is in use (is another demo still running?); stop it, or set $v to a free port" >&2
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

pids=() names=()
# cleanup stops what the demo started (it runs as the EXIT trap).
# shellcheck disable=SC2317
cleanup() {
	local code=$?
	trap - EXIT INT TERM
	if [ ${#pids[@]} -gt 0 ]; then
		kill -TERM "${pids[@]}" 2>/dev/null || true
		wait "${pids[@]}" 2>/dev/null || true
		echo "demo: ${names[*]} stopped (logs and data: $data)"
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

# get prints the body of GET http://host:port/path.
get() {
	local line
	{ exec 3<>"/dev/tcp/${1%:*}/${1##*:}"; } 2>/dev/null || return 1
	printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" "$1" >&3
	while IFS= read -r line <&3 && [ -n "${line%$'\r'}" ]; do :; done
	cat <&3
	exec 3<&- 3>&-
}

# load exports the KEY=value lines of an env file a simulator wrote (read,
# not sourced: a password may hold any character).
load() {
	local key value
	while IFS='=' read -r key value; do
		[ -n "$key" ] && export "$key=$value"
	done <"$1"
}

echo "== starting the demo in $data"

# Exchange: two Client Access servers over HTTPS with a self-signed
# certificate, a seeded organisation, Exchange's realistic latency, and the
# DefaultAccessLevel Quarantine that the retired Intune connector left
# behind (its "unmanaged device access"). From Exchange's own Allow, easguard
# would tighten it only once the seeded phones' blocks passed the
# blast-radius guard, which holds them here (a third of the seeded phones
# are not enrolled).
"$bin"/exchangesim "${orgspec[@]}" -default-access Quarantine -https -cert-out "$data/exchange-ca.pem" \
	-env-out "$data/exchange.env" >"$data/exchangesim.json" 2>"$data/exchangesim.log" &
pids+=($!) names+=(exchangesim)
started "$data/exchangesim.json" "${pids[-1]}" exchangesim
admin=$(field "$data/exchangesim.json" admin)
echo "   exchangesim   $admin (admin API), $(sed -n 's/.*"mailboxes":\([0-9]*\).*"partnerships":\([0-9]*\).*/\1 mailboxes, \2 phones/p' "$data/exchangesim.json")"

# Intune: Entra ID's token endpoint and Microsoft Graph's managedDevices
# over HTTPS with a self-signed certificate, for the same organisation as
# exchangesim's: about 70% of its phones enrolled and compliant, 10%
# non-compliant, 3% retired, 2% without an EAS id, 15% not enrolled.
if [ "$mdm" = graph ]; then
	"$bin"/intunesim "${orgspec[@]}" -addr "$DEMO_INTUNESIM_ADDR" -admin "$DEMO_INTUNESIM_ADMIN" \
		-cert-out "$data/intune-ca.pem" -env-out "$data/intune.env" >"$data/intunesim.json" 2>"$data/intunesim.log" &
	pids+=($!) names+=(intunesim)
	started "$data/intunesim.json" "${pids[-1]}" intunesim
	intune=$(field "$data/intunesim.json" admin)
	graph=$(field "$data/intunesim.json" graph)
	echo "   intunesim     $graph (Graph), $intune (admin API), $(sed -n 's/.*"devices":\([0-9]*\).*/\1/p' "$data/intunesim.json") Intune devices"
fi

# SMTP: a relay that requires STARTTLS and a login, and keeps every mail.
smtp_password=demo-smtp-password
SMTPSIM_PASSWORD=$smtp_password "$bin"/smtpsim -user easguard -require-tls -cert-out "$data/smtp-ca.pem" \
	>"$data/smtpsim.json" 2>"$data/smtpsim.log" &
pids+=($!) names+=(smtpsim)
started "$data/smtpsim.json" "${pids[-1]}" smtpsim
smtp=$(field "$data/smtpsim.json" smtp)
mailapi=$(field "$data/smtpsim.json" api)
echo "   smtpsim       smtp://$smtp (STARTTLS, login), mails at $mailapi"

# The Exchange connection, as the simulator wrote it.
load "$data/exchange.env"

if [ "$mdm" = graph ]; then
	# The Graph source: tenant, application, secret, authority, Graph URL
	# and CA bundle, as intunesim wrote them; no proxy; and a short poll
	# interval, so that an enrolment reaches easguard within seconds.
	load "$data/intune.env"
	export EASGUARD_MDM_GRAPH_PROXY=none
	export EASGUARD_MDM_GRAPH_POLL_INTERVAL=$graph_poll
	export EASGUARD_MDM_GRAPH_MISSING_AFTER=1m
	mdm_args=(-intune "$intune")
else
	# The MDM inventory: what an export job from Intune would write. It
	# starts with one enrolled phone of a colleague, because an empty
	# inventory raises an alert (an MDM export that came out empty must not
	# block anyone).
	inventory=$data/inventory.json
	cat >"$inventory" <<JSON
[
  {"id": "intune-colleague-0001", "userPrincipalName": "demo.colleague@$domain", "easDeviceId": "ApplCOLLEAGUE001",
   "complianceState": "compliant", "managementState": "managed", "operatingSystem": "iOS", "osVersion": "17.4",
   "model": "iPhone 15", "lastSyncDateTime": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
]
JSON
	export EASGUARD_MDM_FILE=$inventory
	mdm_args=(-inventory "$inventory")
fi

# The policy: a pilot, so that the walk shows one phone's journey. With
# everyone in scope, easguard would block every phone that is not enrolled
# and compliant in the MDM at once: with Intune, about a third of the
# organisation's phones; with the inventory file, all of them. Its
# blast-radius guard would refuse that and raise an alert.
policy=$data/policy.yaml
cat >"$policy" <<YAML
# The demo's policy; every key is described in pkg/policy/doc.go.
version: 1
org: $EASGUARD_ORG
# A pilot: easguard manages the demo users' phones and never touches anyone
# else's. To widen it, add mailboxes, domains or groups to include (an empty
# include means every mailbox), e.g.  include: {domains: [$domain]}
# easguard re-reads this file when it changes; a full sync (the console, or
# easguard sync full) then
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

# The console: a break-glass operator with a password made for this demo
# (a lab's way in; production signs in with OpenID Connect, see the
# README), and an API token for the CLI and the walk.
console_password=$(head -c 15 /dev/urandom | base64 | tr '+/' '-_')
printf '%s\n' "$console_password" | "$bin"/easguard hash-password >"$data/console-hash" || fail "could not hash the console password"
printf 'admin device-admin %s\n' "$(cat "$data/console-hash")" >"$data/console-users"
token_out=$("$bin"/easguard hash-password --token)
console_token=$(sed -n 's/^token: //p' <<<"$token_out")
printf 'demo device-admin %s\n' "$(sed -n 's/^tokens file: .* //p' <<<"$token_out")" >"$data/console-tokens"
printf '%s\n' "$console_token" >"$data/console-token"
chmod 600 "$data/console-users" "$data/console-tokens" "$data/console-token"
export EASGUARD_CONSOLE_LOCAL_USERS_FILE=$data/console-users
export EASGUARD_CONSOLE_TOKENS_FILE=$data/console-tokens

"$bin"/easguard run 2>"$data/easguard.log" &
pids+=($!) names+=(easguard)
easguard_pid=${pids[-1]}
for _ in $(seq 1 300); do
	kill -0 "$easguard_pid" 2>/dev/null || fail "easguard exited during start"
	ready && break
	sleep 0.1
done
ready || fail "easguard did not become ready within 30 s"
echo "   easguard      console http://$EASGUARD_CONSOLE_ADDR, health http://$EASGUARD_HTTP_ADDR, NATS nats://$EASGUARD_NATS_LISTEN, quick sync every $quick"
echo

walk=("$bin"/demowalk -org "$EASGUARD_ORG" -nats "nats://$EASGUARD_NATS_LISTEN" -easguard "http://$EASGUARD_CONSOLE_ADDR" -token "$console_token"
	-exchange "$admin" -smtp "$mailapi" "${mdm_args[@]}" -enrol-url "$EASGUARD_MAILER_ENROL_URL"
	-step-timeout "${DEMO_STEP_TIMEOUT:-60s}")
"${walk[@]}" -mailbox "$mailbox@$domain" -device-id "$device" || fail "the walk failed (see above)"

if [ "$check" = 1 ]; then
	echo
	echo "demo: the walk passed (--check); stopping"
	exit 0
fi

if [ "$mdm" = graph ]; then
	sims="Exchange, Intune and SMTP servers"
	mdm_status="the MDM source: mdm.graph"
	intune_id=$(get "${intune#http://}" "/api/devices?easDeviceId=$device" | sed -n 's/^\[{"id":"\([^"]*\)".*/\1/p') || true
	intune_id=${intune_id:-ID}
	mdm_text=$(
		cat <<TXT
  Intune        $graph   (intunesim; easguard reads it every $graph_poll here,
                EASGUARD_MDM_GRAPH_POLL_INTERVAL, whose production default is 2m)
                $intune/api/devices   (every device; ?easDeviceId=$device for the walk's phone)
                $intune/api/requests?kind=graph   (what easguard asked Graph)
                the walk's phone is Intune device $intune_id; easguard blocks or allows it
                within seconds of each of these (sync the phone on Exchange to see it):
                curl -d '{"state":"noncompliant"}' $intune/api/devices/$intune_id/compliance
                curl -d '{"state":"compliant"}' $intune/api/devices/$intune_id/compliance
                curl -X POST $intune/api/devices/$intune_id/retire
                (curl -X DELETE …/api/devices/ID: gone for easguard after 1m here,
                EASGUARD_MDM_GRAPH_MISSING_AFTER, default 24h; a retire counts at once)
                to let ApplMYPHONE0001 in, enrol it:
                curl -d '{"userPrincipalName":"$mailbox@$domain","easDeviceId":"ApplMYPHONE0001","operatingSystem":"iOS","osVersion":"17.4"}' $intune/api/devices
TXT
	)
	scope_text=$(
		cat <<TXT
                a pilot: only demo.*@$domain is managed, though Intune knows most other phones.
                With include: {domains: [$domain]} and a full sync, easguard allows
                the ~180 compliant ones at once (an allow takes mail from nobody), but blocking
                the rest (84 of the 291 phones that get mail: not in Intune, non-compliant,
                retired, no EAS id, or not iOS/Android) is more than the blast-radius guard's
                10%: none of those blocks is applied, the console shows the guard tripped (approve
                or discard it there), and an alert is raised. Widen in steps instead, e.g. mailboxes "a*@$domain" and
                "b*@$domain" first (16 blocks, 6%): a step under 10% goes through
TXT
	)
else
	sims="Exchange and SMTP servers"
	mdm_status="the MDM file: mdm.file"
	mdm_text=$(
		cat <<TXT
  inventory     $inventory   (the MDM export; re-read when it changes)
                to let ApplMYPHONE0001 in, add a record like the walk's with that easDeviceId
                (write a copy next to it, then mv the copy over the file)
TXT
	)
	scope_text=$(
		cat <<TXT
                a pilot: only demo.*@$domain is managed. With include: {domains: [$domain]}
                and a full sync, easguard would block the ~280 phones that get mail
                and that no MDM knows; its blast-radius guard refuses that (100% of the phones
                with mail, limit 10%) and raises an alert instead
TXT
	)
fi

cat <<TXT

easguard is running for organisation "$EASGUARD_ORG" with every worker (pid $easguard_pid),
next to the simulated $sims. Look around:

  console       http://$EASGUARD_CONSOLE_ADDR/   sign in as admin, password $console_password
                (the break-glass users file $data/console-users, role device-admin)
                the overview (syncs, the guard, the policy, $mdm_status), every device
                and its history, quick and full syncs, dead letters, a policy preview
  CLI           export EASGUARD_URL=http://$EASGUARD_CONSOLE_ADDR EASGUARD_TOKEN_FILE=$data/console-token
                $bin/easguard status ; $bin/easguard devices -q demo ; $bin/easguard sync full
  metrics       http://$EASGUARD_HTTP_ADDR/metrics
  NATS          nats://$EASGUARD_NATS_LISTEN   (nats sub 'easguard.$EASGUARD_ORG.>' shows every event)
  NATS monitor  http://$EASGUARD_NATS_MONITOR_LISTEN/jsz?streams=true
  mails         $mailapi/   (JSON: $mailapi/api/messages)
  Exchange      $admin/api/org , $admin/api/partnerships?mailbox=$mailbox
                a new phone syncs (run it again to see its state change):
                curl -d '{"mailbox":"$mailbox@$domain","device_id":"ApplMYPHONE0001","device_type":"iPhone"}' $admin/api/phones/sync
$mdm_text
  policy        $policy
$scope_text
  walk again    another phone of another demo user, against this demo:
                $bin/demowalk -mailbox demo.someone@$domain -exchange $admin -smtp $mailapi \\
                  -nats nats://$EASGUARD_NATS_LISTEN -easguard http://$EASGUARD_CONSOLE_ADDR -token \$(cat $data/console-token) \\
                  ${mdm_args[0]} $(printf %q "${mdm_args[1]}")
  logs          $data/*.log   (easguard's: JSON, one line per event)

Press Ctrl-C to stop.
TXT
wait "$easguard_pid" || true
fail "easguard exited by itself"
