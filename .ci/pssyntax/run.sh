#!/usr/bin/env bash
# Syntax-checks the PowerShell scripts easguard ships with an independent
# parser (tree-sitter-powershell via web-tree-sitter, see check.mjs), because
# CI has no PowerShell, then checks the worker script's contract with the Go
# side (contract.mjs). Installs the pinned npm packages first if
# node_modules is missing or was installed from another package-lock.json.
#
# The project's machines reach no npm registry, so the packages come from an
# npm content cache holding exactly package-lock.json's packages: the one
# named by EASGUARD_NPM_CACHE, else shared/npm-cache beside the clone (as
# CI lays it out). The cache is copied first: npm writes to its cache.
#
# Usage: .ci/pssyntax/run.sh [file.ps1...]   parse these files
#        .ci/pssyntax/run.sh                  parse worker.ps1, bootstrap.ps1, the Pester tests and
#                                             deploy/exchange/*.ps1, check the contract and
#                                             prove the check works (selftest)
#        .ci/pssyntax/run.sh --contract       rewrite pkg/exchange/worker_contract.json
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
top="$(cd "$here/../.." && pwd)"
stamp="$here/node_modules/.installed-from-package-lock.json"

find_cache() {
  local c
  for c in "${EASGUARD_NPM_CACHE:-}" "$top/../shared/npm-cache" "$top/../../shared/npm-cache" /work/shared/npm-cache; do
    if [ -n "$c" ] && [ -d "$c/_cacache" ]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

if ! cmp -s "$here/package-lock.json" "$stamp"; then
  echo "pssyntax: node_modules missing or stale, installing the packages of package-lock.json" >&2
  if cache="$(find_cache)"; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    cp -r "$cache/." "$tmp/"
    chmod -R u+w "$tmp"
    # --ignore-scripts: only the grammar's .wasm is used, never its native addon.
    (cd "$here" && npm ci --offline --cache "$tmp" --no-audit --no-fund --ignore-scripts >&2)
  else
    echo "pssyntax: no npm cache found (set EASGUARD_NPM_CACHE, or lay shared/npm-cache beside the clone); trying the npm registry" >&2
    (cd "$here" && npm ci --no-audit --no-fund --ignore-scripts >&2)
  fi
  cp "$here/package-lock.json" "$stamp"
fi

if [ "${1:-}" = "--contract" ]; then
  cd "$top"
  exec node "$here/contract.mjs" --write
fi
if [ "$#" -gt 0 ]; then
  exec node "$here/check.mjs" "$@"
fi
cd "$top"
node "$here/check.mjs" pkg/exchange/worker.ps1 pkg/exchange/bootstrap.ps1 pkg/exchange/pester/*.ps1 deploy/exchange/*.ps1
node "$here/contract.mjs" --check
node "$here/contract.mjs" --selftest
