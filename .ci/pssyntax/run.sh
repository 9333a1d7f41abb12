#!/usr/bin/env bash
# Syntax-checks the PowerShell scripts easguard ships with an independent
# parser (tree-sitter-powershell via web-tree-sitter, see check.mjs), because
# CI has no PowerShell. Installs the pinned npm packages first if
# node_modules is missing or was installed from another package-lock.json.
#
# Usage: .ci/pssyntax/run.sh [file.ps1...]
#   default: pkg/exchange/worker.ps1 pkg/exchange/bootstrap.ps1
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
stamp="$here/node_modules/.installed-from-package-lock.json"

if ! cmp -s "$here/package-lock.json" "$stamp"; then
  echo "pssyntax: node_modules missing or stale, running npm ci" >&2
  # --ignore-scripts: only the grammar's .wasm is used, never its native addon.
  (cd "$here" && npm ci --no-audit --no-fund --ignore-scripts >&2)
  cp "$here/package-lock.json" "$stamp"
fi

if [ "$#" -eq 0 ]; then
  cd "$here/../.."
  set -- pkg/exchange/worker.ps1 pkg/exchange/bootstrap.ps1
fi
exec node "$here/check.mjs" "$@"
