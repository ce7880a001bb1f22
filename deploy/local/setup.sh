#!/usr/bin/env bash
# Install what klines needs on this machine, idempotently: a Python venv with the project and its pinned
# dependencies (.venv), and the local Kafka broker's jars (.state/kafka-libs). Needs python3 (3.11+), Java 17+
# and Maven; everything else comes from PyPI and Maven Central.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
say() { printf 'setup: %s\n' "$*" >&2; }

python="${PYTHON:-python3}"
for tool in "$python" java mvn; do
    command -v "$tool" >/dev/null || { say "missing $tool: install it first (Python 3.11+, Java 17+, Maven)"; exit 1; }
done

# The browser test of the gateway's chart page drives Debian's Chromium (tests only; `make run` does not need it).
if [[ "${KLINES_SETUP_BROWSER:-auto}" != "no" ]] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        say "installing chromium and chromium-driver (Debian packages) for the browser test"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    elif [[ "${KLINES_SETUP_BROWSER:-auto}" == "yes" || -n "${CI:-}" ]]; then
        say "chromium and chromium-driver are needed for the browser test: install them (apt-get install chromium chromium-driver)"
        exit 1
    else
        say "note: without chromium and chromium-driver the gateway's browser test cannot run"
    fi
fi

stamp=.venv/.klines-installed
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" || constraints.txt -nt "$stamp" ]]; then
    say "creating the Python environment in .venv"
    [[ -x .venv/bin/python ]] || "$python" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
    touch "$stamp"
fi

KLINES_STATE_DIR="${KLINES_STATE_DIR:-$repo/.state}" deploy/kafka/kafka.sh fetch
say "ready: .venv and the Kafka broker jars are installed"
