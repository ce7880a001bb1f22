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
