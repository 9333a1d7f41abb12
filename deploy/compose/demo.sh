#!/usr/bin/env bash
# deploy/compose/demo.sh: `make compose-demo`. Brings the compose set up
# (project easguard, the default host ports), waits until NATS and the
# console are ready, walks each organisation's demo phone through the seed
# flow with bin/demowalk, and prints where to look. Needs bash, curl, the
# images of make images and bin/ of make build. `make compose-down` stops it.
set -euo pipefail
cd "$(dirname "$0")"
compose=(docker-compose)
docker compose version >/dev/null 2>&1 && compose=(docker compose)
compose+=(-f docker-compose.yml -p "${COMPOSE_PROJECT:-easguard}")
bin=$(cd "${BIN_DIR:-../../bin}" && pwd)
secrets=$(./secrets.sh)
export EASGUARD_SECRETS_DIR=$secrets
"${compose[@]}" up -d

# wait URL WHAT: poll until URL answers 200, for at most 3 minutes.
wait_for() {
	local deadline=$((SECONDS + 180))
	until curl -fsS -o /dev/null "$1" 2>/dev/null; do
		[ $SECONDS -lt $deadline ] || { echo "compose-demo: $2 ($1) not ready within 3 minutes" >&2; exit 1; }
		sleep 1
	done
}
wait_for "http://127.0.0.1:${NATS_MONITOR_PORT:-8222}/healthz?js-enabled-only=true" "NATS"
wait_for "http://127.0.0.1:${CONSOLE_HEALTH_PORT:-9090}/readyz" "the console"

# port SERVICE PORT: the host address a container port is published on.
port() { "${compose[@]}" port "$1" "$2" | tail -n 1; }

token=$(cat "$secrets/console-token")
for org in contoso fabrikam; do
	echo
	echo "== $org"
	"$bin/demowalk" -org "$org" -nats "nats://127.0.0.1:${NATS_PORT:-4222}" \
		-easguard "http://127.0.0.1:${CONSOLE_PORT:-8443}" -token "$token" \
		-exchange "http://$(port "exchange-$org" 8080)" -intune "http://$(port "intune-$org" 9091)" \
		-mailpit "http://127.0.0.1:${MAILPIT_PORT:-8025}" -mailbox "demo.$(date +%s)@$org.com" \
		-enrol-url "https://portal.manage.microsoft.com/enrol?org=$org" -step-timeout 90s -full-sync-timeout 4m
done

cat <<TXT

The container set runs (${compose[*]} ps). Look around:
  console   http://127.0.0.1:${CONSOLE_PORT:-8443}/   API token: $secrets/console-token
            EASGUARD_URL=http://127.0.0.1:${CONSOLE_PORT:-8443} EASGUARD_TOKEN_FILE=$secrets/console-token $bin/easguard status
  Jaeger    http://127.0.0.1:${JAEGER_UI_PORT:-16686}/   (query API: /api/traces/<trace id above>)
  Mailpit   http://127.0.0.1:${MAILPIT_PORT:-8025}/api/v1/messages   (the mails to the demo users)
  NATS      nats://127.0.0.1:${NATS_PORT:-4222}, monitor http://127.0.0.1:${NATS_MONITOR_PORT:-8222}/jsz
  Exchange  contoso http://$(port exchange-contoso 8080)/api/org, fabrikam http://$(port exchange-fabrikam 8080)/api/org
  Intune    contoso http://$(port intune-contoso 9091)/api/devices, fabrikam http://$(port intune-fabrikam 9091)/api/devices
Stop it with make compose-down.
TXT
