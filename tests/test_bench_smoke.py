"""The benchmark scripts still run, at a size too small to measure anything."""

from __future__ import annotations

import pytest

from bench import bench_configfile, bench_daemon, bench_realtime, bench_registration
from bench.machine import describe


def test_the_machine_line_names_cpus_and_the_loop() -> None:
    """The machine line says how many CPUs and how long the reference loop took."""
    line = describe()
    assert line.startswith("machine: ")
    assert "CPUs" in line
    assert "Python loop" in line


def test_bench_realtime_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """bench_realtime prints one row per size, its assertions holding."""
    assert bench_realtime.main(["--users", "30", "--backend", "sqlite", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ")
    assert "\n     30 " in out


def test_bench_configfile_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """bench_configfile prints one row per size, one file and in shards."""
    assert bench_configfile.main(["--users", "30", "--repeat", "2"]) == 0
    assert bench_configfile.main(["--users", "30", "--shards", "4", "--repeat", "1"]) == 0
    assert capsys.readouterr().out.count("\n     30 ") == 2


def test_bench_registration_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """bench_registration prints a rate and the stages."""
    assert bench_registration.main(["--events", "200", "--backend", "sqlite", "--stages"]) == 0
    out = capsys.readouterr().out
    assert "\n    sqlite     200 " in out  # the rate row
    assert "store (again)" in out


def test_bench_daemon_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """bench_daemon runs a real daemon on the SQLite realtime target."""
    argv = ["--users", "30", "--target", "sqlite", "--edits", "5", "--baseline-edits", "1"]
    assert bench_daemon.main([*argv, "--burst", "20"]) == 0
    out = capsys.readouterr().out
    assert "realtime on sqlite" in out
    assert "\n    30 " in out  # the figures row, its assertions held


def test_bench_daemon_runs_the_storm_alone(capsys: pytest.CaptureFixture[str]) -> None:
    """bench_daemon with no edits, burst or baseline measures the registration storm alone,
    with the daemon's CPU per event."""
    argv = ["--users", "30", "--target", "sqlite", "--edits", "0", "--burst", "0"]
    assert bench_daemon.main([*argv, "--baseline-edits", "0"]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[-2:]
    figures = dict(zip(header.split(), row.split(), strict=True))
    assert figures["edits"] == figures["burst"] == figures["base_ms"] == "-"
    assert figures["reg_events"] == "30"
    # Counted in 10 ms clock ticks: 30 events may well take less than one.
    assert float(figures["reg_cpu_us"]) >= 0
