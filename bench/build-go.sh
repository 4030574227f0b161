#!/usr/bin/env bash
# Builds the benchmark's client-go "many leases in one process" program once and prints
# its path (cached like interop/build.sh: $LEADERZ_CACHE_DIR, else
# $XDG_CACHE_HOME/leaderz, else ~/.cache/leaderz; keyed by the module's hash).
# Progress on stderr, the path alone on stdout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/clientgo-many"
command -v go >/dev/null || { echo "bench: the Go toolchain is needed to build the client-go program" >&2; exit 1; }
key="$(cat "$here/build-go.sh" "$src"/go.mod "$src"/go.sum "$src"/*.go | sha256sum | cut -c1-12)"
cache_root="${LEADERZ_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/leaderz}"
out="$cache_root/bench/clientgo-many-$key"
if [[ -x "$out" ]]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache_root/bench"
exec 9>"$cache_root/bench/.lock"
flock 9
if [[ ! -x "$out" ]]; then
  echo "bench: building the client-go many-leases program (one time)" >&2
  (cd "$src" && CGO_ENABLED=0 GOFLAGS="-mod=mod -trimpath" go build -ldflags "-s -w" -o "$out.tmp" .)
  mv "$out.tmp" "$out"
fi
echo "$out"
