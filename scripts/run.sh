#!/usr/bin/env bash
# Set up and run provisioner on the embedded default: a SQLite store under ./var/
# with a few sample users, rendered to ./var/pjsip_users.conf. No Asterisk needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/provisioner quickstart "$@"
