#!/usr/bin/env bash
# Run systemd/provisioner.service, exactly as shipped, under a real systemd, and check
# what the unit promises: READY after the first reconcile, an edit live through the
# hardening, SIGHUP, the watchdog, Restart=on-failure, exit 2 not restarted, a clean
# stop, the setgid directory's group, the metrics endpoint, systemd-analyze security's
# score, and realtime rows in a PostgreSQL or MariaDB store (each that answers locally).
#
# The systemd is a container's PID 1: systemd-nspawn boots an overlay of this host's
# own root (its writes go to a tmpfs, the host's files are never touched), with the
# package installed from this tree into /opt/provisioner/.venv by the host's
# /usr/bin/python3, and the tests' AMI peer (scripts/lab_peer.py) on the host's loopback,
# shared with the container.
#
# Needs: root, systemd-nspawn (Debian: apt-get install systemd-container), overlayfs,
# python3-venv, PyPI (the container's pip installs the dependencies), and this tree's
# .venv (scripts/setup.sh). Not run by CI (it needs all that, and takes a minute or two).
# Prints one line per check; exits 1 if any failed.
#
# Usage: sudo bash scripts/systemd-lab.sh [--keep]   (--keep: leave the container running)
set -euo pipefail
cd "$(dirname "$0")/.."
TREE=$PWD
KEEP=${1:-}
PORT=${LAB_AMI_PORT:-15038}
METRICS=${LAB_METRICS_PORT:-19338}
PG=postgresql+psycopg://postgres@127.0.0.1:5432
DB=
PG_MADE=
MARIA_MADE=
LAB=$(mktemp -d /tmp/provisioner-lab.XXXXXX)
ROOT=$LAB/root
COMMANDS=$LAB/peer.cmd
CONFIG=/etc/provisioner/provisioner.toml
CLI=(runuser -u provisioner -- /opt/provisioner/.venv/bin/provisioner --config "$CONFIG")
FAILED=0
PEER_PID=
NSPAWN_PID=
INIT=

ok() { echo "ok    $*"; }
bad() { echo "FAIL  $*"; FAILED=1; }
in_ct() { nsenter -t "$INIT" -a "$@"; }
unit() { in_ct systemctl show provisioner -p "$1" --value; }
reloads() { grep -c "Action=Reload" "$LAB/peer.log" || true; }
reloaded_since() { (($(reloads) > $1)); }
restarted_since() { (($(unit NRestarts) > $1)); }
active() { [[ $(unit ActiveState) == active && $(unit SubState) == running ]]; }
alice_online() { [[ $(in_ct "${CLI[@]}" status alice) == *online* ]]; }
# journal_has TEXT: the unit's journal holds TEXT (read whole: grep -q would cut the pipe).
journal_has() { [[ $(in_ct journalctl -u provisioner -o cat) == *"$1"* ]]; }
# until_true SECONDS COMMAND...: run COMMAND every 0.1 s until it succeeds, or fail.
until_true() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# add_and_time WHAT USERNAME FULL_NAME PREDICATE: add a user by the CLI in the container,
# then say how long after the CLI returned (its transaction committed) PREDICATE held:
# ok under 1 s. Sets $before, the peer's reloads before the add, for PREDICATE.
add_and_time() {
    local what=$1 username=$2 full_name=$3 predicate=$4 added took_ms
    before=$(reloads)
    in_ct "${CLI[@]}" --as admin user add "$username" --profile agents \
        --full-name "$full_name" --email "$username@example.com" >"$LAB/add-$username.log" 2>&1
    added=$(date +%s%N)
    SECRETS+=" $(grep -o 'shown once): [A-Za-z0-9]*' "$LAB/add-$username.log" | cut -d' ' -f3)"
    if ! until_true 2 "$predicate"; then
        bad "$what: not within 2 s"
        return
    fi
    took_ms=$((($(date +%s%N) - added) / 1000000))
    if ((took_ms < 1000)); then
        ok "$what $took_ms ms after the CLI returned"
    else
        bad "$what only $took_ms ms after the CLI returned"
    fi
}

cleanup() {
    if [[ $KEEP == --keep && -n $INIT ]]; then
        echo "kept: nsenter -t $INIT -a bash; peer log $LAB/peer.log (pid $PEER_PID)"
        [[ -z $PG_MADE$MARIA_MADE ]] || echo "kept: database $DB (PostgreSQL ${PG_MADE:+yes}, MariaDB ${MARIA_MADE:+yes})"
        return
    fi
    [[ -n $INIT ]] && in_ct systemctl poweroff >/dev/null 2>&1 || true
    [[ -n $NSPAWN_PID ]] && timeout 20 tail --pid="$NSPAWN_PID" -f /dev/null || true
    [[ -n $PEER_PID ]] && kill "$PEER_PID" 2>/dev/null || true
    [[ -n $PG_MADE ]] && psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $DB" || true
    [[ -n $MARIA_MADE ]] && mariadb -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS $DB" || true
    mountpoint -q "$ROOT" && umount "$ROOT"
    mountpoint -q "$LAB" && umount "$LAB"
    rmdir "$LAB"
}
trap cleanup EXIT

for tool in systemd-nspawn nsenter runuser curl ip /usr/bin/python3 "$TREE/.venv/bin/python"; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done
[[ $(id -u) == 0 ]] || { echo "run as root" >&2; exit 2; }

# -- the container's root: an overlay of / whose upper layer is a tmpfs ----------------
mount -t tmpfs -o size=4G lab "$LAB"
mkdir -p "$LAB/upper" "$LAB/work" "$ROOT"
mount -t overlay overlay -o "lowerdir=/,upperdir=$LAB/upper,workdir=$LAB/work" "$ROOT"
: >"$ROOT/etc/machine-id" # a machine id of its own, made at boot
chroot "$ROOT" useradd --system --home /var/lib/provisioner --shell /usr/sbin/nologin provisioner
chroot "$ROOT" groupadd --system asterisk
# The deployment README gives: the target's directory setgid with Asterisk's group.
chroot "$ROOT" install -d -o provisioner -g asterisk -m 2750 /etc/asterisk/provisioner
chroot "$ROOT" install -d -o provisioner -g provisioner -m 750 /var/lib/provisioner
mkdir -p "$ROOT/opt/provisioner/src" "$ROOT/etc/provisioner"
# The tracked files as they are in the work tree (edits not yet committed included).
git ls-files -z | tar --null -T - -cf - | tar -x -C "$ROOT/opt/provisioner/src"
chroot "$ROOT" /usr/bin/python3 -m venv /opt/provisioner/.venv
chroot "$ROOT" /opt/provisioner/.venv/bin/pip install -q /opt/provisioner/src >"$LAB/pip.log" 2>&1 \
    || { cat "$LAB/pip.log" >&2; exit 2; }
ok "installed this tree into the container's /opt/provisioner/.venv (/usr/bin/python3)"

sed "s/^metrics_port = 0 /metrics_port = $METRICS /" systemd/provisioner.toml >"$ROOT$CONFIG"
# server NAME HOST: an [[asterisk]] entry for the peer's port at HOST.
server() {
    printf '\n[[asterisk]]\nname = "%s"\nhost = "%s"\nport = %s\nusername = "provisioner"\n' \
        "$1" "$2" "$PORT"
    printf 'secret_file = "/etc/provisioner/lab.secret"\n'
}
server lab 127.0.0.1 >>"$ROOT$CONFIG"
# An address of this host's that is not loopback: IPAddressAllow=localhost must keep the
# daemon from it (nothing listens there: refused, unless the firewall stops it first).
OUTSIDE=$(ip -4 -o addr show scope global | awk '{ sub("/.*", "", $4); print $4; exit }')
[[ -z $OUTSIDE ]] || server outside "$OUTSIDE" >>"$ROOT$CONFIG"
cp "$ROOT$CONFIG" "$LAB/base.toml"
printf 'lab-secret\n' >"$ROOT/etc/provisioner/lab.secret"
chroot "$ROOT" chgrp provisioner "$CONFIG" /etc/provisioner/lab.secret
chmod 640 "$ROOT$CONFIG" "$ROOT/etc/provisioner/lab.secret"
(cd /tmp && chroot "$ROOT" "${CLI[@]}" quickstart >"$LAB/quickstart.log")
SECRETS=$(grep -o 'shown once: [A-Za-z0-9]*' "$LAB/quickstart.log" | cut -d' ' -f3)
cp systemd/provisioner.service "$ROOT/etc/systemd/system/"
cat >"$ROOT/etc/systemd/system/lab.target" <<'EOF'
[Unit]
Description=the lab: a basic system and provisioner, nothing else the host enables
Requires=basic.target
After=basic.target
Wants=provisioner.service
EOF

# -- boot ------------------------------------------------------------------------------
"$TREE/.venv/bin/python" scripts/lab_peer.py "$PORT" "$COMMANDS" >"$LAB/peer.log" 2>&1 &
PEER_PID=$!
until_true 10 grep -q listening "$LAB/peer.log" || { cat "$LAB/peer.log" >&2; exit 2; }
systemd-nspawn --quiet --register=no --keep-unit --machine=provisioner-lab -D "$ROOT" \
    --console=pipe -b -- systemd.unit=lab.target >"$LAB/boot.log" 2>&1 &
NSPAWN_PID=$!
until_true 30 pgrep -P "$NSPAWN_PID" -x systemd || { cat "$LAB/boot.log" >&2; exit 2; }
INIT=$(pgrep -P "$NSPAWN_PID" -x systemd)
until_true 60 in_ct systemctl show -p Version --value || { cat "$LAB/boot.log" >&2; exit 2; }
ok "booted systemd $(in_ct systemctl --version | head -1 | cut -d' ' -f2) as the container's PID 1"

if until_true 120 active; then
    ok "Type=notify: active (running) once READY, status \"$(unit StatusText)\""
else
    bad "not active: $(unit ActiveState)/$(unit SubState)"
fi
if until_true 10 grep -qE "Action=Reload .*Module=res_pjsip.so" "$LAB/peer.log"; then
    ok "logged in to the AMI peer and reloaded res_pjsip.so, through the hardening"
else
    bad "no reload reached the AMI peer"
fi

# -- an edit -----------------------------------------------------------------------------
conf=$ROOT/etc/asterisk/provisioner/pjsip_users.conf
live() { grep -q "Lab User" "$conf" && reloaded_since "$before"; }
add_and_time "user add: in the file, and its reload sent" lab.user "Lab User" live

group=$(in_ct stat -c %G /etc/asterisk/provisioner/pjsip_users.conf)
[[ $group == asterisk ]] && ok "the file written by the unit has the setgid directory's group (asterisk)" \
    || bad "the file's group is $group, not asterisk"

echo contact >"$COMMANDS"
if until_true 5 alice_online; then
    ok "a ContactStatus event: provisioner status shows alice online"
else
    bad "alice not online after a ContactStatus"
fi

# -- SIGHUP --------------------------------------------------------------------------------
in_ct systemctl reload provisioner
if journal_has '"config.reloaded"'; then
    ok "systemctl reload: the daemon re-read its configuration (config.reloaded)"
else
    bad "no config.reloaded after systemctl reload"
fi

main=$(unit MainPID)
sed -i 's/^quiet = 0.05 /quiet = -1 /' "$ROOT$CONFIG"
if in_ct systemctl reload provisioner >/dev/null 2>&1; then
    bad "systemctl reload of an invalid file succeeded"
elif active && [[ $(unit MainPID) == "$main" ]] && journal_has "FAIL  config: daemon.quiet"; then
    ok "systemctl reload of an invalid file fails (its problem in the journal); the daemon runs on"
else
    bad "systemctl reload of an invalid file: $(unit ActiveState)/$(unit SubState), pid $(unit MainPID)"
fi
cp "$LAB/base.toml" "$ROOT$CONFIG"

# -- the metrics endpoint ---------------------------------------------------------------
metrics() { curl -sf "http://127.0.0.1:$METRICS/metrics" >"$LAB/metrics.txt"; }
if until_true 5 metrics && grep -q "^provisioner_" "$LAB/metrics.txt"; then
    ok "the Prometheus endpoint answers on 127.0.0.1:$METRICS ($(grep -c '^provisioner_' "$LAB/metrics.txt") provisioner_ samples)"
else
    bad "no metrics on 127.0.0.1:$METRICS"
fi

# -- IPAddressDeny=any, IPAddressAllow=localhost ----------------------------------------
if [[ -z $OUTSIDE ]]; then
    echo "skip  IPAddressAllow=localhost: this host has no address but loopback"
elif until_true 5 journal_has '"server": "outside"'; then
    if journal_has "Errno 1] Operation not permitted"; then
        ok "IPAddressAllow=localhost: connecting to $OUTSIDE is refused by the unit's firewall"
    elif [[ $(unit IPIngressBytes) == "[no data]" ]]; then
        echo "skip  IPAddressAllow=localhost: this systemd applies no BPF firewall here" \
            "(no IP accounting data; the kernel or container forbids it), so $OUTSIDE was reachable"
    else
        bad "IPAddressAllow=localhost: $OUTSIDE was reachable though IP accounting works"
    fi
else
    bad "no connection attempt to $OUTSIDE in the journal"
fi

# -- the score ------------------------------------------------------------------------------
score=$(in_ct systemd-analyze security provisioner.service --no-pager | sed -n 's/.*exposure level for provisioner.service: \([0-9.]*\).*/\1/p')
if awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }'; then
    ok "systemd-analyze security (the running unit): $score"
else
    bad "systemd-analyze security: $score, above 2.0"
fi

# -- the watchdog, a crash, a bad configuration, a stop -------------------------------------
main=$(unit MainPID)
in_ct kill -STOP "$main"
stopped_at=$SECONDS
restarts=$(unit NRestarts)
if until_true 45 restarted_since "$restarts" && until_true 60 active \
    && journal_has "Failed with result 'watchdog'"; then
    ok "a daemon that stops feeding the watchdog is killed and restarted ($((SECONDS - stopped_at)) s after it froze)"
else
    bad "the watchdog did not restart a frozen daemon: $(unit Result), $(unit NRestarts) restarts"
fi
restarts=$(unit NRestarts)
in_ct kill -9 "$(unit MainPID)"
if until_true 10 restarted_since "$restarts" && until_true 60 active; then
    ok "kill -9: restarted (Restart=on-failure)"
else
    bad "not restarted after kill -9"
fi
sed -i 's/^quiet = 0.05 /quiet = -1 /' "$ROOT$CONFIG"
in_ct systemctl restart provisioner >/dev/null 2>&1 || true
sleep 3
if [[ $(unit ExecMainStatus) == 2 && $(unit ActiveState) == failed && $(unit NRestarts) == 0 ]]; then
    ok "an invalid configuration: exit 2, failed, not restarted (RestartPreventExitStatus=2)"
else
    bad "invalid configuration: status $(unit ExecMainStatus), $(unit ActiveState), $(unit NRestarts) restarts"
fi
cp "$LAB/base.toml" "$ROOT$CONFIG"
in_ct systemctl reset-failed provisioner
in_ct systemctl start provisioner
stop_began=$SECONDS
in_ct systemctl stop provisioner
if [[ $(unit Result) == success && $(unit ExecMainStatus) == 0 ]]; then
    ok "systemctl stop: exit 0 within $((SECONDS - stop_began + 1)) s"
else
    bad "systemctl stop: $(unit Result), status $(unit ExecMainStatus)"
fi

# -- realtime rows in PostgreSQL and MariaDB, the store too, under the unit ---------------
ROWS_OF=
has_rows() { [[ $("$ROWS_OF" 2>/dev/null) == "$1" ]]; }
rows_live() { has_rows 5 && reloaded_since "$before"; }
pg_rows() { psql -tA -h 127.0.0.1 -U postgres -d "$DB" -c "SELECT count(*) FROM ps_endpoints"; }
maria_rows() { mariadb -N -h 127.0.0.1 -u root "$DB" -e "SELECT count(*) FROM ps_endpoints"; }
# realtime_on WHAT URL USERNAME ROWS_FUNCTION: the unit on a store at URL (made by
# quickstart in the container) with realtime rows in it; ROWS_FUNCTION counts them.
realtime_on() {
    local what=$1 url=$2 username=$3
    ROWS_OF=$4
    sed -e "s|^url = \"sqlite:////var/lib/provisioner/provisioner.db\"|url = \"$url\"|" \
        -e 's/^kind = "config" /kind = "realtime" /' "$LAB/base.toml" >"$ROOT$CONFIG"
    in_ct "${CLI[@]}" quickstart >"$LAB/quickstart-$username.log"
    in_ct systemctl start provisioner
    if until_true 60 active && has_rows 4; then
        ok "$what: READY, the 4 users' ps_endpoints rows in the store's database"
    else
        bad "$what: $(unit ActiveState)/$(unit SubState), $("$ROWS_OF") rows"
    fi
    add_and_time "$what: user add's rows written, and its reload sent" \
        "$username" "Realtime User" rows_live
}
DB=provisioner_lab_$$
if pg_isready -q -h 127.0.0.1 -p 5432; then
    psql -q -h 127.0.0.1 -U postgres -c "CREATE DATABASE $DB" && PG_MADE=1
    realtime_on "realtime on PostgreSQL" "$PG/$DB" pg.user pg_rows
    if journal_has '"store.listening"'; then
        ok "realtime on PostgreSQL: the daemon LISTENs for the store's NOTIFY (store.listening)"
    else
        bad "realtime on PostgreSQL: no store.listening in the journal"
    fi
    in_ct systemctl stop provisioner
else
    echo "skip  realtime on PostgreSQL: no server on 127.0.0.1:5432"
fi
if mysqladmin -h 127.0.0.1 -u root ping >/dev/null 2>&1; then
    mariadb -h 127.0.0.1 -u root -e "CREATE DATABASE $DB" && MARIA_MADE=1
    realtime_on "realtime on MariaDB" "mysql+pymysql://root@127.0.0.1:3306/$DB" maria.user maria_rows
    in_ct systemctl stop provisioner
else
    echo "skip  realtime on MariaDB: no server on 127.0.0.1:3306"
fi
if [[ -n $PG_MADE$MARIA_MADE ]]; then
    [[ $(unit Result) == success ]] && ok "realtime: systemctl stop, exit 0" || bad "realtime: stop: $(unit Result)"
fi

# -- the journal ----------------------------------------------------------------------------
# The fake Asterisk holds none of the added endpoints: each add logged pjsip.not_live.
warnings=$(in_ct journalctl -u provisioner -p warning -o cat)
if grep -q '^{.*"event": "pjsip.not_live"' <<<"$warnings"; then
    ok "journalctl -p warning finds the daemon's warnings, each line its JSON object"
else
    bad "no pjsip.not_live at priority warning in the journal"
fi
journal=$(in_ct journalctl -u provisioner -o cat)
if grep -q Traceback <<<"$journal"; then bad "a traceback in the journal"; else ok "no traceback in the journal"; fi
leaked=0
for secret in $SECRETS lab-secret; do grep -qF "$secret" <<<"$journal" && leaked=1; done
((leaked)) && bad "a secret in the journal" || ok "no SIP or AMI secret in the journal"
exit "$FAILED"
