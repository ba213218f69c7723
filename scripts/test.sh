#!/usr/bin/env bash
# Set up and run the whole test suite: lint, types, then pytest against real
# SQLite, PostgreSQL and MariaDB.  This is what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
.venv/bin/ruff check provisioner tests bench scripts
.venv/bin/ruff format --check provisioner tests bench scripts
.venv/bin/mypy
exec .venv/bin/pytest -n 2 "$@"
