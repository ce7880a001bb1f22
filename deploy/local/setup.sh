#!/usr/bin/env bash
# Install what klines needs on this machine, idempotently: a Python venv with the project, its pinned
# dependencies, the embedded ClickHouse engine (the `embedded` extra: chDB) and the test tools (.venv), and the
# local Kafka broker's jars (.state/kafka-libs). Needs python3 (3.11+), Java 17+ and Maven; everything else comes
# from PyPI and Maven Central. It installs no system package unless asked (KLINES_SETUP_BROWSER=yes, below).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
say() { printf 'setup: %s\n' "$*" >&2; }

python="${PYTHON:-python3}"
for tool in "$python" java mvn; do
    command -v "$tool" >/dev/null || { say "missing $tool: install it first (Python 3.11+, Java 17+, Maven)"; exit 1; }
done

# The browser test of the gateway's chart page drives Debian's Chromium (tests only; `make run` does not need it).
# Installing system packages is never assumed: KLINES_SETUP_BROWSER=yes asks for it (CI does, in .ci/run); without
# it, a machine lacking Chromium skips that one test.
have_browser() { { command -v chromium && command -v chromedriver; } >/dev/null; }
if [[ "${KLINES_SETUP_BROWSER:-no}" == "yes" ]]; then
    if ! have_browser; then
        if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
            say "installing chromium and chromium-driver (Debian packages) for the browser test (KLINES_SETUP_BROWSER=yes)"
            apt-get update -qq >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
        else
            say "KLINES_SETUP_BROWSER=yes needs root and apt-get to install chromium and chromium-driver: install them yourself (sudo apt-get install chromium chromium-driver)"
            exit 1
        fi
    fi
elif ! have_browser; then
    say "note: no chromium/chromium-driver, so the gateway's browser test will be skipped (KLINES_SETUP_BROWSER=yes installs them, as root)"
fi

stamp=.venv/.klines-installed
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" || constraints.txt -nt "$stamp" ]]; then
    say "creating the Python environment in .venv"
    [[ -x .venv/bin/python ]] || "$python" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[embedded,dev]"
    touch "$stamp"
fi

KLINES_STATE_DIR="${KLINES_STATE_DIR:-$repo/.state}" deploy/kafka/kafka.sh fetch
say "ready: .venv and the Kafka broker jars are installed"
