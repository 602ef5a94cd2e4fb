#!/usr/bin/env bash
# Prepares the Python virtual environment that runs the test peers (tests/peers/).
#
# Creates <repo>/target/venv with `python3 -m venv` when it is missing or broken, and installs
# tests/peers/requirements.txt into it when that file (or the interpreter) changed since the last
# install, which a stamp file inside the venv records. Downloads are cached outside the
# repository in ${MAILROOM_CACHE:-$HOME/.cache/mailroom}/pip, so a fresh clone installs from the
# cache. Progress goes to stderr; the last line on stdout is the venv's python.
#
# Environment: PYTHON (interpreter to build the venv from, default python3), MAILROOM_CACHE.
set -euo pipefail

log() { echo "pyenv: $*" >&2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/target/venv"
requirements="$repo/tests/peers/requirements.txt"
stamp="$venv/.mailroom-requirements.sha256"
python="${PYTHON:-python3}"
cache="${MAILROOM_CACHE:-$HOME/.cache/mailroom}"

export PIP_CACHE_DIR="$cache/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_NO_WARN_SCRIPT_LOCATION=1
mkdir -p "$PIP_CACHE_DIR" "$repo/target"

if ! command -v "$python" >/dev/null 2>&1; then
    log "error: $python not found; install Python 3.9 or newer (e.g. apt-get install python3 python3-venv)"
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)'; then
    log "error: $("$python" --version 2>&1) is too old; Python 3.9 or newer is needed"
    exit 1
fi

# Two builds may run this at once; one prepares the venv while the other waits.
exec 9>"$repo/target/.venv.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

want="$(
    {
        cat "$requirements"
        "$python" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
)"

if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    log "the virtual environment at $venv is broken; recreating it"
    rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
    log "creating the virtual environment $venv with $("$python" --version 2>&1)"
    rm -rf "$venv"
    if ! "$python" -m venv "$venv" >&2; then
        log "error: '$python -m venv' failed; on Debian install python3-venv"
        rm -rf "$venv"
        exit 1
    fi
fi

have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$have" = "$want" ]; then
    log "up to date: $venv"
else
    log "installing $(grep -cE '^[A-Za-z0-9]' "$requirements") pinned packages from tests/peers/requirements.txt (cache $PIP_CACHE_DIR)"
    rm -f "$stamp"
    "$venv/bin/python" -m pip install \
        --disable-pip-version-check \
        --no-input \
        --require-virtualenv \
        --only-binary=:all: \
        --progress-bar off \
        --quiet \
        -r "$requirements" >&2
    if ! check="$("$venv/bin/python" -m pip check 2>&1)"; then
        log "error: inconsistent packages: $check"
        exit 1
    fi
    echo "$want" >"$stamp"
    log "installed: $("$venv/bin/python" -m pip freeze --disable-pip-version-check | paste -sd' ' -)"
fi

echo "$venv/bin/python"
