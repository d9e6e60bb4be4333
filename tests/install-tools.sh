#!/bin/sh
# Install the programs the tests use, from the system's packages, when missing.
# Without root or apt-get, the tests that need them skip with a clear reason.
need=""
command -v socat >/dev/null 2>&1 || need="$need socat"
command -v systemd-socket-activate >/dev/null 2>&1 || need="$need systemd"
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
command -v unshare >/dev/null 2>&1 || need="$need util-linux"
command -v setsid >/dev/null 2>&1 || need="$need util-linux"
command -v useradd >/dev/null 2>&1 || need="$need passwd"
[ -z "$need" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing test tools:$need"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need) >/dev/null 2>&1 \
        || echo "warning: could not install$need; tests needing them will be skipped"
else
    echo "note: missing$need (not root or no apt-get); tests needing them will be skipped"
fi
exit 0
