#!/bin/sh
# Install the programs the tests use, from the system's packages, when missing.
# Without root or apt-get, the tests that need them skip with a clear reason.
need=""
command -v socat >/dev/null 2>&1 || need="$need socat"
# nc: the README's examples, walked by tests/test_readme.py; ip: its network namespace.
command -v nc >/dev/null 2>&1 || need="$need netcat-openbsd"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
command -v systemd-socket-activate >/dev/null 2>&1 || need="$need systemd"
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
# The real-systemd test (tests/test_systemd_real.py) boots a container.
command -v debootstrap >/dev/null 2>&1 || need="$need debootstrap"
command -v systemd-nspawn >/dev/null 2>&1 || need="$need systemd-container"
command -v nsenter >/dev/null 2>&1 || need="$need util-linux"
command -v unshare >/dev/null 2>&1 || need="$need util-linux"
# The hostile-neighbour tests (tests/test_hostile.py) make users and new sessions.
command -v setsid >/dev/null 2>&1 || need="$need util-linux"
command -v useradd >/dev/null 2>&1 || need="$need passwd"
# The scale-out tests run the real HAProxy (tests/test_haproxy.py); the container test
# runs preforkd as PID 1 of its own PID namespace with unshare (tests/test_container.py).
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need="$need haproxy"
updated=""
if [ -n "$need" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing test tools:$need"
        # policy-rc.d 101: no package may start its service (haproxy's, say) on this machine
        policy=/usr/sbin/policy-rc.d
        made_policy=""
        if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1; fi
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need) >/dev/null 2>&1 \
            || echo "warning: could not install$need; tests needing them will be skipped"
        [ -n "$made_policy" ] && rm -f "$policy"
        updated=1
    else
        echo "note: missing$need (not root or no apt-get); tests needing them will be skipped"
    fi
fi
# promtool (checks etc/prometheus's alert rules): only that program out of Debian's
# prometheus package, unpacked to /usr/local/bin; installing the package itself would
# also install (and on some systems start) a Prometheus server.
if ! command -v promtool >/dev/null 2>&1 && [ ! -x /usr/local/bin/promtool ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
        echo "installing test tool: promtool (from Debian's prometheus package)"
        dir=$(mktemp -d)
        ( [ -n "$updated" ] || apt-get update -qq ) >/dev/null 2>&1
        if (cd "$dir" && apt-get download -qq prometheus && dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool) >/dev/null 2>&1 \
            && install -m 0755 "$dir/usr/bin/promtool" /usr/local/bin/promtool; then
            :
        else
            echo "warning: could not install promtool; the promtool checks will be skipped"
        fi
        rm -rf "$dir"
    else
        echo "note: promtool missing (not root or no apt-get); the promtool checks will be skipped"
    fi
fi
exit 0
