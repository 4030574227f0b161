#!/usr/bin/env bash
# Builds the local control plane (kube-apiserver + etcd) from Go modules, once.
#
# Usage: controlplane/build.sh        prints the directory holding both binaries
#
# - If KUBEBUILDER_ASSETS names a directory with kube-apiserver and etcd (the
#   envtest convention), that directory is used and nothing is built.
# - Otherwise the binaries are built from the wrapper modules next to this
#   script (static, version-stamped) into a cache directory keyed by the hash
#   of the wrapper modules, so they are rebuilt only when a pinned version
#   changes. Cache root: $LEADERZ_CACHE_DIR, else $XDG_CACHE_HOME/leaderz,
#   else ~/.cache/leaderz.
# Progress goes to stderr; the directory is the only line on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  if [[ -x "$KUBEBUILDER_ASSETS/kube-apiserver" && -x "$KUBEBUILDER_ASSETS/etcd" ]]; then
    echo "control plane: using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS" >&2
    echo "$KUBEBUILDER_ASSETS"
    exit 0
  fi
  echo "control plane: KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks an executable kube-apiserver or etcd" >&2
  exit 1
fi

command -v go >/dev/null || { echo "control plane: the Go toolchain is needed to build kube-apiserver and etcd (or set KUBEBUILDER_ASSETS)" >&2; exit 1; }

pinned() { awk -v m="$1" '$1 == m && $2 ~ /^v[0-9]/ { print $2; exit }' "$2"; }
k8s_version="$(pinned k8s.io/kubernetes "$here/kube-apiserver/go.mod")"
etcd_version="$(pinned go.etcd.io/etcd/server/v3 "$here/etcd/go.mod")"
[[ -n "$k8s_version" && -n "$etcd_version" ]] || { echo "control plane: cannot read the pinned versions from the wrapper go.mod files" >&2; exit 1; }

key="$(cat "$here/build.sh" "$here"/kube-apiserver/go.{mod,sum} "$here"/etcd/go.{mod,sum} | sha256sum | cut -c1-12)"
cache_root="${LEADERZ_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/leaderz}"
out="$cache_root/controlplane/k8s-$k8s_version-etcd-$etcd_version-$key"

if [[ -x "$out/kube-apiserver" && -x "$out/etcd" ]]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache_root/controlplane"
# One build at a time (test binaries may start in parallel); the second waits and
# then finds the first one's result.
exec 9>"$cache_root/controlplane/.lock"
flock 9
if [[ -x "$out/kube-apiserver" && -x "$out/etcd" ]]; then
  echo "$out"
  exit 0
fi
tmp="$(mktemp -d "$cache_root/controlplane/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

export CGO_ENABLED=0 GOFLAGS="-mod=mod -trimpath"
minor="${k8s_version#v1.}"; minor="${minor%%.*}"
start=$SECONDS

echo "control plane: building etcd $etcd_version (one time; cached in $out)" >&2
(cd "$here/etcd" && go build -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
echo "control plane: etcd built in $((SECONDS - start))s; building kube-apiserver $k8s_version (several minutes on 2 cores)" >&2
(cd "$here/kube-apiserver" && go build -ldflags "-s -w \
    -X k8s.io/component-base/version.gitVersion=$k8s_version \
    -X k8s.io/component-base/version.gitMajor=1 \
    -X k8s.io/component-base/version.gitMinor=$minor \
    -X k8s.io/component-base/version.gitTreeState=clean \
    -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z" \
  -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver)
echo "control plane: built in $((SECONDS - start))s" >&2

mkdir -p "$out"
mv "$tmp/etcd" "$tmp/kube-apiserver" "$out/"
echo "$out"
