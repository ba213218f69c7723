#!/usr/bin/env bash
# Set up and run provisioner on the embedded default: a SQLite store under ./var/
# with a few sample users, rendered to ./var/pjsip_users.conf, then the daemon
# (Ctrl-C stops it). No Asterisk is needed: with no [[asterisk]] configured it
# only keeps the file in step with the store.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/provisioner quickstart
exec .venv/bin/provisioner run "$@"
