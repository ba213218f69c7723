"""The soak: seeded random edits by concurrent writers while faults are injected; run by hand.

    .venv/bin/python -m tests.soak --edits 10000 --seed 1 [--dir /tmp/soak] [--target realtime]

Writers: the accounts API (add, edit, disable, enable, delete, restore, purge, CSV import)
and plain SQL updates, each in its own thread.  Faults, one at a time at random: the fake
Asterisk drops every connection, refuses logins for a while, answers "A reload is in
progress", goes silent; another process holds the SQLite file locked (BEGIN EXCLUSIVE) for
seconds; the daemon is SIGKILLed and restarted.  At the end, after quiescence, the target
must equal a from-scratch render (``render --dry-run`` shows no change) and the daemon log
must hold no Traceback; with ``--target realtime`` (sorcery cache ``ep_cache``), every run
after a SIGKILL must have emptied the cache.  Prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from provisioner import csvio
from provisioner.accounts import Accounts, Policy
from provisioner.errors import ProvisionerError

from .amipeer import FakeAsterisk
from .faultkit import PYTHON, Daemon, cheap_hasher, cli, seed_store, store_url, write_config

OPS = ("add", "edit", "edit", "edit", "disable", "enable", "delete", "restore", "purge", "csv")


class Soak:
    def __init__(self, tmp: Path, seed: int, edits: int) -> None:
        self.tmp = tmp
        self.rng = random.Random(seed)
        self.target_edits = edits
        self.edits = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.engine = seed_store(store_url(tmp), 40)
        self.acc = Accounts(self.engine, Policy(password_policy=False))
        self.next_name = 0

    def _count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def _edit_done(self) -> bool:
        with self.lock:
            self.edits += 1
            return self.edits >= self.target_edits

    def api_writer(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            op = rng.choice(OPS)
            try:
                self._api_op(rng, op)
                self._count(f"edit.{op}")
            except (ProvisionerError, DBAPIError) as exc:
                self._count(f"refused.{type(exc).__name__}")
            if self._edit_done():
                self.stop.set()

    def _names(self, deleted: bool) -> list[str]:
        return [u.username for u in self.acc.list_users(deleted=deleted) if u.username != "root"]

    def _api_op(self, rng: random.Random, op: str) -> None:
        live = self._names(False)
        if op == "add" or not live:
            with self.lock:
                self.next_name += 1
                name = f"s{self.next_name}"
            self.acc.add_user(
                {
                    "username": name,
                    "full_name": "Soak",
                    "email": f"{name}@e.com",
                    "profile": "agents",
                }
            )
        elif op == "edit":
            self.acc.edit_user(
                rng.choice(live),
                {
                    "nat": rng.choice(["yes", "no", "comedia"]),
                    "full_name": f"N {rng.randint(0, 99)}",
                },
            )
        elif op in ("disable", "enable", "delete"):
            getattr(self.acc, op)([rng.choice(live)])
        elif op in ("restore", "purge"):
            gone = self._names(True)
            if gone:
                getattr(self.acc, op)([rng.choice(gone)])
        elif op == "csv":
            rows = "\n".join(
                f"{n},Csv {rng.randint(0, 9)},{n}@e.com,agents"
                for n in rng.sample(live, min(3, len(live)))
            )
            csvio.import_users(self.acc, "username,full_name,email,profile\n" + rows + "\n")

    def sql_writer(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        text("UPDATE users SET context = :c WHERE id = (SELECT id FROM users "
                             "WHERE username != 'root' ORDER BY random() LIMIT 1)"),
                        {"c": rng.choice(["from-sip", "agents", "internal"])},
                    )  # fmt: skip
                self._count("edit.sql")
            except DBAPIError as exc:
                self._count(f"refused.sql.{type(exc).__name__}")
            if self._edit_done():
                self.stop.set()
            time.sleep(0.01)


def _hold_lock(db: Path, seconds: float) -> subprocess.Popen[bytes]:
    code = (
        "import sqlite3,sys,time;c=sqlite3.connect(sys.argv[1],timeout=30,isolation_level=None);"
        "c.execute('BEGIN EXCLUSIVE');time.sleep(float(sys.argv[2]));c.execute('COMMIT')"
    )
    return subprocess.Popen([PYTHON, "-c", code, str(db), str(seconds)])


def run(tmp: Path, seed: int, edits: int, target: str = "config") -> dict[str, Any]:
    cheap_hasher()
    soak = Soak(tmp, seed, edits)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    peer = FakeAsterisk()
    asyncio.run_coroutine_threadsafe(peer.start(), loop).result(10)
    config = write_config(
        tmp,
        kind=target,
        extra=[
            "reconcile_interval = 20",
            "[ami]", "reload_min_gap = 0", "reload_gap_factor = 0", "backoff_base = 0.05",
            "backoff_cap = 0.5", "reload_retry_delay = 0.1", "action_timeout = 2",
            "ping_interval = 1", "ping_timeout = 1",
            "[[asterisk]]", 'name = "pbx1"', 'host = "127.0.0.1"', f"port = {peer.port}",
            'username = "provisioner"', 'secret = "lab-secret"', 'sorcery_caches = ["ep_cache"]',
        ],
    )  # fmt: skip
    log = tmp / "daemon.log"
    daemon = Daemon(config, log).start()
    faults: collections.Counter[str] = collections.Counter()
    restarts = 0
    started = time.monotonic()
    writers = [threading.Thread(target=soak.api_writer, args=(seed * 10 + i,)) for i in range(2)]
    writers.append(threading.Thread(target=soak.sql_writer, args=(seed * 10 + 9,)))
    for w in writers:
        w.start()
    rng = random.Random(seed + 1)
    while not soak.stop.is_set():
        time.sleep(rng.uniform(0.5, 2.0))
        kind = rng.choice(["drop", "refuse_logins", "reload_busy", "silent", "lock", "kill"])
        faults[kind] += 1
        if kind == "drop":
            loop.call_soon_threadsafe(peer.drop_all)
        elif kind == "refuse_logins":
            peer.secret = "not-the-secret"
            loop.call_soon_threadsafe(peer.drop_all)
            time.sleep(rng.uniform(0.5, 2))
            peer.secret = "lab-secret"
        elif kind == "reload_busy":
            peer.reload_busy = rng.randint(1, 3)
        elif kind == "silent":
            peer.silent = True
            time.sleep(rng.uniform(0.5, 2))
            peer.silent = False
        elif kind == "lock":
            _hold_lock(tmp / "store.db", rng.uniform(1, 3)).wait()
        else:
            daemon.kill()
            daemon = Daemon(config, log).start(timeout=60)
            restarts += 1
    for w in writers:
        w.join()
    edit_seconds = time.monotonic() - started
    peer.reload_busy = 0
    # Quiescence: the daemon catches up by itself (no hand-run sync).
    deadline = time.monotonic() + 120
    converged = False
    while time.monotonic() < deadline:
        out = cli(config, "render", "--dry-run").out
        if "would be added 0, would be updated 0, would be removed 0" in out:
            converged = True
            break
        time.sleep(1)
    final = cli(config, "render", "--dry-run").out
    assert daemon.stop() == 0
    asyncio.run_coroutine_threadsafe(peer.stop(), loop).result(10)
    text_log = log.read_text()
    return {
        "seed": seed,
        "edits": soak.edits,
        "edit_seconds": round(edit_seconds, 1),
        "ops": dict(sorted(soak.counts.items())),
        "faults": dict(faults),
        "daemon_restarts": restarts,
        "converged": converged,
        "final_diff_lines": [ln for ln in final.splitlines() if ln.startswith(("+", "-", "would"))][
            -3:
        ],
        "tracebacks_in_log": text_log.count("Traceback"),
        "target": target,
        "reloads_seen": len(peer.actions("Reload")),
        "caches_emptied": len(peer.actions("SorceryMemoryCacheExpire")),
        "log": str(log),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--target", choices=["config", "realtime"], default="config")
    args = parser.parse_args()
    tmp = args.dir or Path(tempfile.mkdtemp(prefix="soak-"))
    tmp.mkdir(parents=True, exist_ok=True)
    result = run(tmp, args.seed, args.edits, args.target)
    print(json.dumps(result, indent=2))
    # Realtime: each run after a SIGKILL empties the caches once (its expiries may be lost).
    emptied = args.target == "config" or result["caches_emptied"] >= result["daemon_restarts"]
    return 0 if result["converged"] and not result["tracebacks_in_log"] and emptied else 1


if __name__ == "__main__":
    sys.exit(main())
