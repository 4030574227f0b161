#!/usr/bin/env bash
# Builds the node components of the local one-node cluster from Go modules, once:
# kubelet, kube-controller-manager, kube-scheduler, kube-proxy (Kubernetes pinned in
# node/go.mod, the same version as kube-apiserver) and the sandbox program `pause`.
#
# Usage: controlplane/build-node.sh   prints the directory holding the five binaries
#
# Like build.sh: static (CGO_ENABLED=0), version-stamped, cached in a directory keyed by
# the hash of the wrapper module, serialised with build.sh by the same lock (one Go build
# at a time on a small machine; the second one reuses the first one's build cache).
# Cache root: $LEADERZ_CACHE_DIR, else $XDG_CACHE_HOME/leaderz, else ~/.cache/leaderz.
# Progress goes to stderr ("[2/5] kube-controller-manager ..."); the directory is the
# only line on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
binaries=(kubelet kube-controller-manager kube-scheduler kube-proxy pause)

command -v go >/dev/null || { echo "node: the Go toolchain is needed to build the kubelet and the other node components" >&2; exit 1; }

k8s_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v[0-9]/ { print $2; exit }' "$here/node/go.mod")"
[[ -n "$k8s_version" ]] || { echo "node: cannot read the pinned Kubernetes version from node/go.mod" >&2; exit 1; }

key="$(cat "$here/build-node.sh" "$here"/node/go.{mod,sum} "$here/node/pause/main.go" | sha256sum | cut -c1-12)"
cache_root="${LEADERZ_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/leaderz}"
out="$cache_root/node/k8s-$k8s_version-$key"

complete() {
  local b
  for b in "${binaries[@]}"; do [[ -x "$out/$b" ]] || return 1; done
}

if complete; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache_root/controlplane" "$cache_root/node"
exec 9>"$cache_root/controlplane/.lock"
if ! flock -n 9; then
  echo "node: waiting for another Go build of the control plane to finish" >&2
  flock 9
fi
if complete; then
  echo "$out"
  exit 0
fi
tmp="$(mktemp -d "$cache_root/node/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

export CGO_ENABLED=0 GOFLAGS="-mod=mod -trimpath"
minor="${k8s_version#v1.}"; minor="${minor%%.*}"
ldflags="-s -w \
  -X k8s.io/component-base/version.gitVersion=$k8s_version \
  -X k8s.io/component-base/version.gitMajor=1 \
  -X k8s.io/component-base/version.gitMinor=$minor \
  -X k8s.io/component-base/version.gitTreeState=clean \
  -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
start=$SECONDS
n=0
for b in "${binaries[@]}"; do
  n=$((n + 1))
  t=$SECONDS
  if [[ "$b" == pause ]]; then
    pkg=./pause
  else
    pkg="k8s.io/kubernetes/cmd/$b"
  fi
  echo "node: [$n/${#binaries[@]}] building $b $k8s_version (one time; cached in $out)" >&2
  (cd "$here/node" && go build -ldflags "$ldflags" -o "$tmp/$b" "$pkg")
  echo "node: [$n/${#binaries[@]}] $b built in $((SECONDS - t))s" >&2
done
echo "node: all built in $((SECONDS - start))s" >&2

mkdir -p "$out"
for b in "${binaries[@]}"; do mv "$tmp/$b" "$out/"; done
echo "$out"
