"""Benchmark of the realtime target (a script, not a test).

    .venv/bin/python -m bench.bench_realtime --users 1000 10000 100000 --backend sqlite postgresql

For each backend and size, in a throwaway database (created and dropped here, as the tests
do), it measures:

* ``sync``: a full :meth:`RealtimeTarget.apply` by a new target into empty tables (rows +
  ownership records; COPY on PostgreSQL, JSON_TABLE on MariaDB);
* ``raw``: the same rows inserted by the driver's own ``cursor.executemany`` in one
  transaction into empty tables (no ownership records, no comparison): the floor;
* ``ratio``: sync / raw, each the median of ``runs`` runs, alternated, each into empty
  tables of one database: at least ``--repeat`` (default 3), more for small sizes, up to
  about two seconds in all (one run of each swings by up to 30% on a busy 2-core
  machine, and a median of three runs of a few milliseconds is mostly noise).  One
  database and engine, so SQLAlchemy's statement cache is warm, as in the daemon after
  its first sync and as the raw baseline's statements, compiled outside its timing; and
  the process has made one small sync first (its imports and first compilations are not
  the first size's); ``ratio_q1`` and ``ratio_q3``: the quartiles of the per-pair
  ratios (each sync over the raw run beside it), how far one comparison strays;
* ``cold``: the first full sync of a new engine into a new database (statements compiled
  in it): what a daemon's first reconcile costs;
* ``core``: the same rows through SQLAlchemy Core ``executemany`` in one transaction;
* ``unchanged``: a second full apply with nothing changed (must write nothing): it reads
  only the ownership records' digests;
* ``unch_cold``: the same by a new target object (no digests cached from the last apply:
  every user's digest is computed);
* ``verify``: the same with ``verify=True`` (every managed column read and compared);
* ``drift``: a verifying full apply after one row was edited by hand (it must put it back;
  a plain apply must not even notice);
* ``partial_1st``: one changed user through :meth:`RealtimeTarget.apply_partial`, the first
  after the full applies (statements compiled on first use);
* ``partial``: the median of 21 more such one-user changes (other users);
* ``all_changed``: a full apply in which every user changed (what a profile or template
  edit causes): every AOR row updated;
* peak RSS of the process so far (``ru_maxrss``).

Rendering (``pjsip.render_all``) is timed separately and not part of ``sync``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, select

from provisioner.pjsip import RenderSettings, UserObjects, render_all
from provisioner.targets.asterisk_schema import metadata as asterisk_metadata
from provisioner.targets.asterisk_schema import ps_aors, ps_auths, ps_endpoints
from provisioner.targets.realtime import RealtimeTarget

from .common import Column, make_users, peak_rss_mb, print_header, print_row, temp_engine, timed
from .machine import describe
from .measure import Compared, alternated_medians, ratio_figures

__all__ = ["main", "make_users"]

_TABLES = (ps_endpoints, ps_auths, ps_aors)


def _read_rows(engine: Engine) -> dict[Table, list[dict[str, Any]]]:
    """Every row of the three tables as the target wrote them (the columns it filled)."""
    out: dict[Table, list[dict[str, Any]]] = {}
    with engine.connect() as conn:
        for table in _TABLES:
            rows = [dict(r._mapping) for r in conn.execute(select(table))]
            used = [c for c in table.c if any(r[c.name] is not None for r in rows[:100])]
            out[table] = [{c.name: r[c.name] for c in used} for r in rows]
    return out


def _raw_insert(engine: Engine, rows: dict[Table, list[dict[str, Any]]]) -> float:
    """The driver's ``executemany`` of ``rows`` in one transaction (SQL compiled by Core)."""
    RealtimeTarget(engine).create_tables()
    prepared = []
    for table, dicts in rows.items():
        if not dicts:
            continue
        columns = list(dicts[0])
        compiled = table.insert().compile(dialect=engine.dialect, column_keys=columns)
        # Outside the timing: parameters in the driver's own style (positional for sqlite3,
        # named with escaped names for psycopg and pymysql).
        escaped: dict[str, str] = dict(compiled.escaped_bind_names or {})
        params: list[Any] = []
        for d in dicts:
            bound = compiled.construct_params(d)
            if compiled.positional:
                params.append(tuple(bound[k] for k in compiled.positiontup or []))
            else:
                params.append({escaped.get(k, k): v for k, v in bound.items()})
        prepared.append((str(compiled), params))
    raw = engine.raw_connection()
    try:
        start = time.perf_counter()
        cur = raw.cursor()
        if engine.dialect.name == "sqlite":
            cur.execute("BEGIN IMMEDIATE")
        for sql, params in prepared:
            cur.executemany(sql, params)
        raw.commit()
        took = time.perf_counter() - start
        cur.close()
    finally:
        raw.close()
    return took


def _core_insert(engine: Engine, rows: dict[Table, list[dict[str, Any]]]) -> float:
    """SQLAlchemy Core ``executemany`` of ``rows`` in one transaction."""
    RealtimeTarget(engine).create_tables()
    start = time.perf_counter()
    with engine.begin() as conn:
        for table, dicts in rows.items():
            if dicts:
                conn.execute(table.insert(), dicts)
    return time.perf_counter() - start


def _hand_edit(engine: Engine, endpoint_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            ps_endpoints.update()
            .where(ps_endpoints.c.id == endpoint_id)
            .values(context="edited-by-hand")
        )


def run_one(backend: str, count: int, scratch: Path, repeat: int = 1) -> dict[str, float]:
    """All measurements for one backend and size; ``sync_s`` and ``raw_s`` are medians of
    alternated runs (at least ``repeat``, see :func:`_sync_and_raw_medians`); ``cold_s`` is
    the first sync, by the target the other figures reuse, of a new engine."""
    settings = RenderSettings()
    users = make_users(count)
    (objects, skipped), render_s = timed(lambda: render_all(users, settings))
    assert not skipped, skipped[:3]
    figures: dict[str, float] = {"users": count, "render_s": render_s}
    with temp_engine(backend, scratch) as engine:
        target = RealtimeTarget(engine)
        target.create_tables()
        change, figures["sync_s"] = timed(lambda: target.apply(objects))
        assert len(change.added) == count, change
        again, figures["unchanged_s"] = timed(lambda: target.apply(objects))
        assert again.empty, again
        assert not again.wrote, again
        cold, figures["unch_cold_s"] = timed(lambda: RealtimeTarget(engine).apply(objects))
        assert cold.empty, cold
        assert not cold.wrote, cold
        checked, figures["verify_s"] = timed(lambda: target.apply(objects, verify=True))
        assert checked.empty, checked
        assert not checked.wrote, checked
        victim = objects[count // 2]
        _hand_edit(engine, victim.endpoint_id)
        assert target.apply(objects).empty
        healed, figures["drift_s"] = timed(lambda: target.apply(objects, verify=True))
        assert healed.updated == (victim.endpoint_id,), healed
        one = _changed(victim)
        part, figures["partial_1st_s"] = timed(lambda: target.apply_partial([one], []))
        assert part.updated == (victim.endpoint_id,), part
        others = [obj for obj in objects if obj.endpoint_id != victim.endpoint_id]
        figures["partial_s"] = _partial_median(target, others)
        everyone = [_changed(obj, "9") for obj in objects]
        moved, figures["all_changed_s"] = timed(lambda: target.apply(everyone))
        assert len(moved.updated) == count, len(moved.updated)
        assert target.apply(objects).updated, "back to the rows the raw baseline reads"
        rows = _read_rows(engine)
    figures["cold_s"] = figures["sync_s"]
    compared = _sync_and_raw_medians(backend, scratch, objects, rows, repeat)
    figures.update(ratio_figures(compared, "sync_s", "raw_s"))
    with temp_engine(backend, scratch) as engine:
        figures["core_s"] = _core_insert(engine, rows)
    figures["rows_per_s"] = 3 * count / figures["sync_s"]
    figures["peak_rss_mb"] = peak_rss_mb()
    return figures


def _sync_and_raw_medians(
    backend: str,
    scratch: Path,
    objects: Sequence[UserObjects],
    rows: dict[Table, list[dict[str, Any]]],
    repeat: int,
) -> Compared:
    """Medians of full syncs of ``objects`` (each by a new target) and of raw inserts of
    ``rows``, alternated, each into empty tables of one database, and how many of each
    (:func:`~bench.measure.alternated_medians`).

    One database and engine for all: the engine's statement cache is then warm, as in
    the daemon after its first sync, and as the raw baseline's statements, compiled
    outside its timing.  (``cold_s`` is the first sync of a new engine.)"""
    with temp_engine(backend, scratch) as engine:

        def sync() -> float:
            _empty(engine)
            fresh = RealtimeTarget(engine)
            fresh.create_tables()
            change, took = timed(partial(fresh.apply, objects))
            assert len(change.added) == len(objects), change
            return took

        def raw() -> float:
            _empty(engine)
            return _raw_insert(engine, rows)

        return alternated_medians(sync, raw, repeat)


def _empty(engine: Engine) -> None:
    """Drop the target's tables (the PJSIP tables and the ownership records)."""
    with engine.begin() as conn:
        asterisk_metadata.drop_all(conn)


def _warm_up(backend: str, scratch: Path) -> None:
    """One small full sync, so that the first size measured does not carry this process's
    one-time costs (imports, first compilations of SQLAlchemy's and ours)."""
    objects, _ = render_all(make_users(50), RenderSettings())
    with temp_engine(backend, scratch) as engine:
        target = RealtimeTarget(engine)
        target.create_tables()
        target.apply(objects)


def _partial_median(target: RealtimeTarget, objects: Sequence[UserObjects]) -> float:
    """Median time of 21 one-user changes through ``apply_partial`` (different users,
    spread over the set), as the daemon applies an edit."""
    step = max(1, len(objects) // 23)
    took = []
    for obj in objects[step::step][:21]:
        one = _changed(obj)
        part, seconds = timed(partial(target.apply_partial, [one], []))
        assert part.updated == (obj.endpoint_id,), part
        took.append(seconds)
    return statistics.median(took)


def _changed(obj: UserObjects, max_contacts: str = "7") -> UserObjects:
    """``obj`` with its AOR's max_contacts changed (to ``max_contacts``)."""
    aor = tuple((k, max_contacts if k == "max_contacts" else v) for k, v in obj.aor)
    return replace(obj, aor=aor)


_COLUMNS: tuple[Column, ...] = (
    ("users", "{:>7.0f}"),
    ("sync_s", "{:>8.3f}"),
    ("rows_per_s", "{:>9.0f}"),
    ("raw_s", "{:>7.3f}"),
    ("core_s", "{:>7.3f}"),
    ("ratio", "{:>6.2f}"),
    ("ratio_q1", "{:>8.2f}"),
    ("ratio_q3", "{:>8.2f}"),
    ("runs", "{:>4.0f}"),
    ("cold_s", "{:>7.3f}"),
    ("unchanged_s", "{:>11.3f}"),
    ("unch_cold_s", "{:>11.3f}"),
    ("verify_s", "{:>8.3f}"),
    ("drift_s", "{:>8.3f}"),
    ("partial_1st_s", "{:>13.4f}"),
    ("partial_s", "{:>9.4f}"),
    ("all_changed_s", "{:>13.3f}"),
    ("render_s", "{:>8.3f}"),
    ("peak_rss_mb", "{:>11.0f}"),
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark for every requested size and backend; print one table per backend."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_realtime")
    parser.add_argument("--users", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument(
        "--backend", nargs="+", default=["sqlite"], choices=["sqlite", "postgresql", "mariadb"]
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="full syncs and raw baselines to take the median of (default 3)",
    )
    args = parser.parse_args(argv)
    print(describe(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_realtime_") as tmp:
        for backend in args.backend:
            _warm_up(backend, Path(tmp))
            print_header(backend, _COLUMNS)
            for count in args.users:
                print_row(_COLUMNS, run_one(backend, count, Path(tmp), args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
