#!/usr/bin/env bash
# Builds a Go program of this project once and prints its path: by default the
# client-go interop candidate; `build.sh DIR` builds the Go module in DIR (the
# benchmark's programs use this). Cached like the control plane: $LEADERZ_CACHE_DIR,
# else $XDG_CACHE_HOME/leaderz, else ~/.cache/leaderz; keyed by the module's hash.
# Progress on stderr, the path alone on stdout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$(cd "${1:-$here/clientgo-candidate}" && pwd)"
name="$(basename "$src")"
command -v go >/dev/null || { echo "the Go toolchain is needed to build $name" >&2; exit 1; }
key="$(cat "$here/build.sh" "$src"/go.mod "$src"/go.sum "$src"/*.go | sha256sum | cut -c1-12)"
cache_root="${LEADERZ_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/leaderz}"
out="$cache_root/go/$name-$key"
if [[ -x "$out" ]]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache_root/go"
exec 9>"$cache_root/go/.lock"
flock 9
if [[ ! -x "$out" ]]; then
  echo "building $name from Go modules (one time)" >&2
  (cd "$src" && CGO_ENABLED=0 GOFLAGS="-mod=mod -trimpath" go build -ldflags "-s -w" -o "$out.tmp" .)
  mv "$out.tmp" "$out"
fi
echo "$out"
