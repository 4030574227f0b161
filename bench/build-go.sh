#!/usr/bin/env bash
# Builds the benchmark's client-go "many leases in one process" program once and
# prints its path (the same cached Go build as the interop candidate).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$here/../interop/build.sh" "$here/clientgo-many"
