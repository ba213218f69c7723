#!/usr/bin/env bash
# Make sure the PostgreSQL and MariaDB servers the tests use are up on 127.0.0.1,
# starting them (as this machine's packages install them) when they are not.
set -uo pipefail

wait_for() {  # wait_for NAME CMD...: up to 30 s
  local name=$1; shift
  for _ in $(seq 60); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "services: $name did not come up" >&2; return 1
}

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  echo "services: starting PostgreSQL" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start || true
  wait_for PostgreSQL pg_isready -q -h 127.0.0.1 -p 5432 || exit 1
fi
if ! mariadb-admin -h 127.0.0.1 -uroot ping >/dev/null 2>&1; then
  echo "services: starting MariaDB" >&2
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
  wait_for MariaDB mariadb-admin -h 127.0.0.1 -uroot ping || exit 1
fi
