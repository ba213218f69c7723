#!/usr/bin/env bash
# Run the whole test suite against the oldest dependency releases pyproject.toml
# allows (constraints/minimum.txt), in its own ./.venv-min.  Not part of CI (it
# installs a second environment); run it whenever a floor or a dependency changes.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-min
.venv-min/bin/python -m pip install -q --upgrade pip
.venv-min/bin/python -m pip install -q -r constraints/minimum.txt
.venv-min/bin/python -m pip install -q --no-deps -e .
bash scripts/services.sh
exec .venv-min/bin/pytest -n 2 "$@"
