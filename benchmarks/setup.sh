#!/usr/bin/env bash
# Everything the benchmarks need, from nothing; idempotent. Run from the repository root
# (`make bench` does): bash benchmarks/setup.sh
#   - Debian packages for the peers and the compiler: redis-server, libnet-server-perl, gcc
#     (installed only when missing; needs root). Redis is NOT started as a service: the
#     harness runs its own redis-server on loopback.
#   - benchmarks/build/loadgen compiled from benchmarks/loadgen.c (when the source is newer)
#   - matplotlib (the chart) and uvloop (preforkd's event-driven peer on uvloop) in the project venv (.venv)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
perl -MNet::Server::PreFork -e 1 >/dev/null 2>&1 || missing+=(libnet-server-perl)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup.sh: missing ${missing[*]}; install them (as root: apt-get install ${missing[*]})" >&2
        exit 1
    fi
    echo "setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d 101: the package's post-install must not start redis as a system service
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    status=0
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
    if ((created_policy)); then rm -f "$policy"; fi
    if ((status)); then
        echo "setup.sh: apt-get install failed ($status)" >&2
        exit "$status"
    fi
fi

mkdir -p benchmarks/build
if [[ ! -x benchmarks/build/loadgen || benchmarks/loadgen.c -nt benchmarks/build/loadgen ]]; then
    echo "setup.sh: compiling benchmarks/build/loadgen"
    gcc -O2 -Wall -Wextra -o benchmarks/build/loadgen benchmarks/loadgen.c
fi

if [[ ! -x $VENV/bin/python ]]; then
    echo "setup.sh: $VENV missing; run 'make venv' first" >&2
    exit 1
fi
if ! "$VENV/bin/python" -c 'import matplotlib, psutil, uvloop' >/dev/null 2>&1; then
    echo "setup.sh: installing matplotlib and uvloop (the event-driven preforkd peer's loop) into $VENV"
    "$VENV/bin/pip" install -q 'matplotlib>=3.7' 'psutil>=5.9' 'uvloop>=0.17'
fi
echo "setup.sh: ready (loadgen: benchmarks/build/loadgen)"
