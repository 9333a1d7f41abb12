#!/usr/bin/env bash
# deploy/compose/secrets.sh [DIR]: makes the compose set's secrets as files in
# DIR (default $EASGUARD_SECRETS_DIR, else deploy/compose/secrets), keeping
# those that exist:
#   exchange-password     the Exchange service account's (exchangesim's) password
#   graph-client-secret   the Graph app's client secret (intunesim's)
#   console-tokens        the console's API tokens file (name role sha256)
#   console-token         the token itself, for the CLI and the walk (not mounted)
# Needs bin/easguard (make build). The files are owned by the images' user
# (65532) when run as root, else readable by all (a lab).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-${EASGUARD_SECRETS_DIR:-$here/secrets}}
bin=${BIN_DIR:-$here/../../bin}
mkdir -p "$dir"
random() { head -c 24 /dev/urandom | base64 | tr '+/' '-_'; }
[ -s "$dir/exchange-password" ] || printf '%s\n' "Ex-$(random)" >"$dir/exchange-password"
[ -s "$dir/graph-client-secret" ] || printf '%s\n' "$(random)" >"$dir/graph-client-secret"
if [ ! -s "$dir/console-tokens" ] || [ ! -s "$dir/console-token" ]; then
	out=$("$bin/easguard" hash-password --token)
	sed -n 's/^token: //p' <<<"$out" >"$dir/console-token"
	printf 'compose device-admin %s\n' "$(sed -n 's/^tokens file: .* //p' <<<"$out")" >"$dir/console-tokens"
fi
for f in exchange-password graph-client-secret console-tokens console-token; do
	if [ "$(id -u)" = 0 ]; then
		chown 65532:65532 "$dir/$f"
		chmod 0400 "$dir/$f"
	else
		chmod 0444 "$dir/$f"
	fi
done
echo "$dir"
