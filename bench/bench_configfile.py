"""Benchmark of the config-file target (a script, not a test).

    .venv/bin/python -m bench.bench_configfile --users 1000 10000 100000 [--shards 1024]

For each size, in a throwaway directory (and a throwaway SQLite store), it measures
(with ``--shards N``, N >= 1, the same figures for the sharded layout, ``target.shards``:
a main file including N shard files; the sizes and writes are then of all files):

* ``sync``: :meth:`ConfigFileTarget.apply` of ``pjsip.render_all``'s output into an absent
  file (shipped templates, parse-back check, atomic write with fsync; no diff: only
  ``plan`` makes one);
* ``raw``: the baseline: one plain Jinja2 template (one loop, no include or macro)
  rendering the same objects, plus one plain ``write_bytes`` of the text;
* ``ratio``: sync / raw (target: at most 1.5), each the median of ``runs`` runs,
  alternated, each by a new target into a new file: at least ``--repeat`` (default 3),
  more for small sizes, up to about two seconds in all (see ``bench.measure``); the
  process has made one small sync first (its imports and template compilations are
  not the first size's); ``ratio_q1`` and ``ratio_q3``: the quartiles of the per-pair
  ratios (each sync over the raw run beside it), how far one comparison strays;
* ``first``: the first sync of the size, by the target the figures below reuse;
* ``tmpl``: the shipped templates' render alone (:meth:`ConfigFileTarget.render_text`),
  to show how much of ``sync`` is templating;
* ``unchanged``: a second apply of the same objects (must write nothing; target < 1 s at
  100k); ``unch_cold``: the same from a new target object (as after a daemon restart);
* ``chg_cold``: a new target object applying the objects with one user's ``context``
  changed into the files the first target wrote (a daemon restarted after an edit
  made while it was down, or ``sync --once``): the current files are read back to
  count the change (without the general parser when they are canonical, see
  :mod:`provisioner.targets.canonical`), then written; measured last, after
  ``write_s``;
* ``store_full``: :meth:`Applier.full` over a real SQLite store holding the same users
  (loading, rendering, applying into a second file);
* ``one_user``: one user's ``context`` changed in that store by SQL, then
  :meth:`Applier.users_changed` for it (the daemon's path for one edit: the target's
  ``apply_partial``), after the heap is settled as the daemon settles it after a full
  reconcile (collected once, then frozen); ``one_med``: the median of that for
  :data:`MORE_EDITS` more users, one after the other;
* ``write_s``: the floor of any change to one file this size (sharded: the largest
  shard file): the atomic replace alone (temporary file written and fsynced, ``.bak``
  link, rename, directory fsync) of bytes already in memory, over an existing file;
* peak RSS of the process so far (``ru_maxrss``); the users and targets of the figures
  above ``store_full`` are let go before the store's are made, so it is about one
  set's, as in the daemon (with every copy a full sync and an edit make on the way).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import jinja2
from sqlalchemy import update

from provisioner.applier import Applier
from provisioner.logs import configure
from provisioner.pjsip import RenderSettings, UserObjects, render_all
from provisioner.store.engine import open_engine
from provisioner.store.schema import users as users_table
from provisioner.targets.configfile import ConfigFileTarget
from provisioner.targets.files import atomic_write
from provisioner.targets.sharded import ShardedConfigFileTarget

from .common import Column, make_users, peak_rss_mb, print_header, print_row, seed_store, timed
from .machine import describe
from .measure import alternated_medians, ratio_figures

__all__ = ["MORE_EDITS", "PLAIN_TEMPLATE", "main", "run_one"]

#: Edits of other users after the first, for ``one_med``.
MORE_EDITS = 9

#: The baseline: the same file layout from one plain template.
PLAIN_TEMPLATE = """\
; pjsip_users.conf - generated
{% for u in users %}
[{{ u.endpoint_id }}]
type=endpoint
{% for k, v in u.endpoint %}{{ k }}={{ v }}
{% endfor %}
[{{ u.auth_id }}]
type=auth
{% for k, v in u.auth %}{{ k }}={{ v }}
{% endfor %}
[{{ u.aor_id }}]
type=aor
{% for k, v in u.aor %}{{ k }}={{ v }}
{% endfor %}{% endfor %}"""


def _raw(objects: list[UserObjects], path: Path) -> float:
    """Seconds for one plain template render of ``objects`` and one plain file write (the
    file removed afterwards)."""
    template = jinja2.Environment(autoescape=False).from_string(PLAIN_TEMPLATE)  # noqa: S701
    _, took = timed(lambda: path.write_bytes(template.render(users=objects).encode()))
    path.unlink()
    return took


def _target(path: Path, shards: int) -> ConfigFileTarget | ShardedConfigFileTarget:
    """The one-file target (``shards`` 0) or the sharded one, writing ``path``."""
    return ShardedConfigFileTarget(path, shards=shards) if shards else ConfigFileTarget(path)


def _files(target: ConfigFileTarget | ShardedConfigFileTarget) -> list[Path]:
    """Every file the target writes: the file, or the main file and each shard file."""
    if isinstance(target, ShardedConfigFileTarget):
        return [target.path, *target.files]
    return [target.path]


def _holding(target: ConfigFileTarget | ShardedConfigFileTarget, endpoint_id: str) -> Path:
    """The file that holds the user of ``endpoint_id``."""
    if isinstance(target, ShardedConfigFileTarget):
        return target.file_of(endpoint_id)
    return target.path


def _settle_heap() -> None:
    """What the daemon does after each full reconcile (see provisioner.daemon)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _store_figures(
    count: int, tmp: Path, settings: RenderSettings, shards: int
) -> dict[str, float]:
    """``store_full``, ``one_user`` and ``one_med`` through the Applier over a real SQLite
    store."""
    engine = open_engine(f"sqlite:///{tmp / 'store.db'}")
    try:
        seed_store(engine, count)
        target = _target(tmp / "store_pjsip.conf", shards)
        applier = Applier(engine, target, settings)
        full, store_full = timed(applier.full)
        assert len(full.change.added) == count, full.change
        _settle_heap()
        took: list[float] = []
        for victim in range(count // 2 + 1, count // 2 + 2 + MORE_EDITS):
            with engine.begin() as conn:
                conn.execute(
                    update(users_table)
                    .where(users_table.c.id == victim)
                    .values(context=f"bench-ctx-{victim}")
                )
            one, seconds = timed(partial(applier.users_changed, [victim]))
            endpoint_id = str(100000 + victim - 1)
            assert one.change.updated == (endpoint_id,), one.change
            assert one.change.wrote
            # Bytes, read and let go: a decoded copy, kept to the next edit, put 62 MB
            # (124 MB while decoding) on the peak RSS at 100k users.
            assert (
                f"context=bench-ctx-{victim}\n".encode()
                in _holding(target, endpoint_id).read_bytes()
            )
            took.append(seconds)
    finally:
        gc.unfreeze()
        engine.dispose()
    return {
        "store_full_s": store_full,
        "one_user_s": took[0],
        "one_med_s": statistics.median(took[1:]),
    }


def _fresh_sync(objects: list[UserObjects], directory: Path, shards: int) -> float:
    """Seconds of a full sync of ``objects`` by a new target into an empty ``directory``
    (removed afterwards, so that many runs at 100k users do not fill the disk)."""
    directory.mkdir()
    try:
        target = _target(directory / "pjsip_users.conf", shards)
        change, took = timed(lambda: target.apply(objects))
        assert len(change.added) == len(objects), change
    finally:
        shutil.rmtree(directory)
    return took


def _warm_up(scratch: Path, shards: int) -> None:
    """One small sync and baseline, so that the first size measured does not carry this
    process's one-time costs (imports, the first template compilations)."""
    objects, _ = render_all(make_users(50), RenderSettings())
    with tempfile.TemporaryDirectory(dir=scratch) as name:
        _fresh_sync(objects, Path(name) / "warm", shards)
        _raw(objects, Path(name) / "warm_raw.conf")


def run_one(count: int, scratch: Path, shards: int = 0, repeat: int = 1) -> dict[str, float]:
    """All measurements for one size (``shards``: 0 for one file, else that many shards);
    ``sync_s`` and ``raw_s`` are medians of alternated runs (at least ``repeat``), each by a
    new target into a new file.  The users and targets of the file figures are let go
    before the store figures make their own: the peak RSS is that of one set of users,
    as in the daemon, not of two."""
    settings = RenderSettings()
    with tempfile.TemporaryDirectory(dir=scratch) as name:
        tmp = Path(name)
        figures = _file_figures(count, tmp, settings, shards, repeat)
        figures.update(_store_figures(count, tmp, settings, shards))
    figures["peak_rss_mb"] = peak_rss_mb()
    return figures


def _file_figures(
    count: int, tmp: Path, settings: RenderSettings, shards: int, repeat: int
) -> dict[str, float]:
    """Every figure of :func:`run_one` but the store's, for ``count`` users written in
    ``tmp``."""
    (objects, skipped), render_s = timed(lambda: render_all(make_users(count), settings))
    assert not skipped, skipped[:3]
    figures: dict[str, float] = {"users": count, "render_s": render_s}
    target = _target(tmp / "pjsip_users.conf", shards)
    change, sync_s = timed(lambda: target.apply(objects))
    assert change.wrote, change
    assert len(change.added) == count, change
    figures["first_s"] = sync_s
    compared = alternated_medians(
        partial(_fresh_sync, objects, tmp / "again", shards),
        partial(_raw, objects, tmp / "raw.conf"),
        repeat,
    )
    figures.update(ratio_figures(compared, "sync_s", "raw_s"))
    if isinstance(target, ShardedConfigFileTarget):
        _, figures["tmpl_s"] = timed(lambda: target.render_files(objects))
    else:
        _, figures["tmpl_s"] = timed(lambda: target.render_text(objects))
    files = _files(target)
    mtimes = [path.stat().st_mtime_ns for path in files]
    again, figures["unchanged_s"] = timed(lambda: target.apply(objects))
    assert again.empty, again
    assert not again.wrote, again
    cold = _target(target.path, shards)
    again, figures["unch_cold_s"] = timed(lambda: cold.apply(objects))
    assert again.empty, again
    assert not again.wrote, again
    assert [path.stat().st_mtime_ns for path in files] == mtimes
    figures["mbytes"] = sum(path.stat().st_size for path in files) / 1e6
    data = max((path.read_bytes() for path in files), key=len)
    atomic_write(tmp / "floor.conf", data, backup=False)
    _, figures["write_s"] = timed(lambda: atomic_write(tmp / "floor.conf", data, backup=True))
    figures["chg_cold_s"] = _changed_cold(objects, target.path, shards)
    return figures


def _changed_cold(objects: list[UserObjects], path: Path, shards: int) -> float:
    """Seconds of a new target's apply of ``objects`` with one user's ``context`` changed
    into the files at ``path`` (which hold ``objects``)."""
    at = len(objects) // 2
    user = objects[at]
    endpoint = tuple((k, "bench-cold" if k == "context" else v) for k, v in user.endpoint)
    wanted = [*objects[:at], replace(user, endpoint=endpoint), *objects[at + 1 :]]
    cold = _target(path, shards)
    change, took = timed(lambda: cold.apply(wanted))
    assert change.updated == (user.endpoint_id,), change
    assert change.wrote, change
    return took


COLUMNS: tuple[Column, ...] = (
    ("users", "{:>7.0f}"),
    ("mbytes", "{:>6.1f}"),
    ("sync_s", "{:>7.3f}"),
    ("raw_s", "{:>6.3f}"),
    ("ratio", "{:>5.2f}"),
    ("ratio_q1", "{:>8.2f}"),
    ("ratio_q3", "{:>8.2f}"),
    ("runs", "{:>4.0f}"),
    ("first_s", "{:>7.3f}"),
    ("tmpl_s", "{:>6.3f}"),
    ("unchanged_s", "{:>7.3f}"),
    ("unch_cold_s", "{:>7.3f}"),
    ("chg_cold_s", "{:>7.3f}"),
    ("store_full_s", "{:>7.3f}"),
    ("one_user_s", "{:>7.3f}"),
    ("one_med_s", "{:>7.4f}"),
    ("write_s", "{:>7.3f}"),
    ("render_s", "{:>7.3f}"),
    ("peak_rss_mb", "{:>7.0f}"),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every requested size; print one table, one row per size as it completes."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_configfile")
    parser.add_argument("--users", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument(
        "--shards", type=int, default=0, help="target.shards: 0 one file (default), else N"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="full syncs and raw baselines to take the median of (default 3)",
    )
    args = parser.parse_args(argv)
    print(describe(), flush=True)
    configure(level="warning")  # no sync.applied line per apply amid the table
    layout = f"{args.shards} shard files" if args.shards else "one file"
    with tempfile.TemporaryDirectory(prefix="bench_configfile_") as tmp:
        print_header(
            f"config file ({layout}), seconds (ratio = sync / raw; target <= 1.5)", COLUMNS
        )
        _warm_up(Path(tmp), args.shards)
        for count in args.users:
            print_row(COLUMNS, run_one(count, Path(tmp), args.shards, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
