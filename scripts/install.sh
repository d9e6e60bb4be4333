#!/bin/sh
# Install preforkd for a systemd-style deployment (run by `make install`):
#
#   $VENV                         a virtualenv with preforkd and its dependencies
#   $PREFIX/bin/preforkd          a symlink to the virtualenv's console script
#   $SYSCONFDIR/preforkd/preforkd.toml   the commented example configuration
#                                 (an existing file is kept: it is yours)
#   $UNITDIR/preforkd.service, preforkd.socket   the systemd units (replaced), with
#                                 ExecStart pointing at $PREFIX/bin/preforkd
#
# Usage: scripts/install.sh [--wheels DIR]
#   --wheels DIR   install preforkd and its dependencies from the wheels in DIR only
#                  (pip install --no-index --find-links DIR), e.g. made with
#                  `pip wheel -w DIR .`; default: build this checkout, dependencies
#                  from the package index.
# Environment (defaults in brackets):
#   DESTDIR      staging root prepended to every path [empty]; the virtualenv's
#                scripts still name their final place, so it runs once DESTDIR is
#                the root (a package build, a container image)
#   PREFIX       [/usr/local]        SYSCONFDIR  [/etc]
#   VENV         [/opt/preforkd/venv]
#   UNITDIR      [/etc/systemd/system]
#   PYTHON       [python3]           the interpreter the virtualenv is made from
# Nothing is started or enabled: the last lines printed say how.
set -eu

PREFIX=${PREFIX:-/usr/local}
SYSCONFDIR=${SYSCONFDIR:-/etc}
VENV=${VENV:-/opt/preforkd/venv}
UNITDIR=${UNITDIR:-/etc/systemd/system}
PYTHON=${PYTHON:-python3}
DESTDIR=${DESTDIR:-}
src=$(cd "$(dirname "$0")/.." && pwd)
wheels=""
while [ $# -gt 0 ]; do
    case $1 in
        --wheels) wheels=$(cd "$2" && pwd); shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
step() { echo "install.sh: $*"; }

venv=$DESTDIR$VENV
step "virtualenv $venv"
"$PYTHON" -m venv "$venv"
if [ -n "$wheels" ]; then
    step "preforkd and its dependencies from $wheels"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-index --find-links "$wheels" preforkd
else
    step "preforkd from $src, dependencies from the package index"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$src"
fi
if [ -n "$DESTDIR" ]; then
    # pip wrote the staging path into the scripts' #! lines; they run from $VENV.
    for f in "$venv"/bin/*; do
        if [ -f "$f" ] && [ ! -L "$f" ] && head -c 2 "$f" | grep -q '^#!'; then
            sed -i "1s|^#!$venv/|#!$VENV/|" "$f"
        fi
    done
    sed -i "s|$venv|$VENV|g" "$venv"/bin/activate*
fi

step "$DESTDIR$PREFIX/bin/preforkd -> $VENV/bin/preforkd"
mkdir -p "$DESTDIR$PREFIX/bin"
ln -sfn "$VENV/bin/preforkd" "$DESTDIR$PREFIX/bin/preforkd"

# The shipped files come from the installed package (what `preforkd sample-config`
# prints), so the configuration and the units always match the installed code.
shipped() { "$venv/bin/python" -m preforkd sample-config "$1"; }
conf=$DESTDIR$SYSCONFDIR/preforkd/preforkd.toml
if [ -e "$conf" ]; then
    step "$conf exists: kept (compare with: preforkd sample-config)"
else
    step "$conf"
    mkdir -p "$(dirname "$conf")"
    shipped preforkd.toml > "$conf.new"
    chmod 0644 "$conf.new"
    mv "$conf.new" "$conf"
fi
mkdir -p "$DESTDIR$UNITDIR"
for unit in preforkd.service preforkd.socket; do
    step "$DESTDIR$UNITDIR/$unit"
    shipped $unit | sed -e "s|/usr/local/bin/preforkd|$PREFIX/bin/preforkd|g" \
        -e "s|/etc/preforkd/preforkd.toml|$SYSCONFDIR/preforkd/preforkd.toml|g" > "$DESTDIR$UNITDIR/$unit.new"
    chmod 0644 "$DESTDIR$UNITDIR/$unit.new"
    mv "$DESTDIR$UNITDIR/$unit.new" "$DESTDIR$UNITDIR/$unit"
done

cat <<EOF
install.sh: done. Next:
  $PREFIX/bin/preforkd check -c $SYSCONFDIR/preforkd/preforkd.toml
  systemctl daemon-reload && systemctl enable --now preforkd
  systemctl status preforkd
EOF
