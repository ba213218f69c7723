"""The worker pool: blocking work off the event loop that never holds the process."""

from __future__ import annotations

import asyncio
import contextvars
import subprocess
import sys
import threading
import time

import pytest

from provisioner.threads import WorkerPool, in_worker

_who: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


def test_in_worker_returns_the_result_with_the_callers_context() -> None:
    """A call in a worker returns its result and sees the caller's context variables."""

    async def scenario() -> tuple[int, str, bool]:
        _who.set("daemon")
        total = await in_worker(sum, [1, 2, 3])
        who = await in_worker(_who.get)
        daemon = await in_worker(lambda: threading.current_thread().daemon)
        return total, who, daemon

    assert asyncio.run(scenario()) == (6, "daemon", True)


def test_in_worker_raises_what_the_call_raised() -> None:
    """An exception raised in the worker reaches the awaiting side."""

    def fails() -> None:
        raise LookupError("gone")

    with pytest.raises(LookupError, match="gone"):
        asyncio.run(in_worker(fails))


def test_threads_are_reused_and_bounded() -> None:
    """Sequential calls reuse one thread; concurrent ones start at most max_workers."""
    pool = WorkerPool(2)
    for _ in range(5):
        assert pool.submit(lambda: 1).result(timeout=5) == 1
    assert pool.threads == 1
    release = threading.Event()
    futures = [pool.submit(release.wait, 5) for _ in range(4)]
    time.sleep(0.1)
    assert pool.threads == 2
    release.set()
    assert all(f.result(timeout=5) for f in futures)
    pool.shutdown()


def test_shutdown_does_not_wait_for_a_stuck_call_and_refuses_new_work() -> None:
    """shutdown returns while a call is stuck, and later submits are refused."""
    pool = WorkerPool(1)
    never = threading.Event()
    pool.submit(never.wait)
    started = time.monotonic()
    pool.shutdown(wait=True)
    assert time.monotonic() - started < 1.0
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
    never.set()


def test_a_process_with_a_stuck_call_still_exits() -> None:
    """A Python process whose event loop left a worker call stuck exits when its main
    code ends, where asyncio.to_thread's would hang."""
    code = (
        "import asyncio, threading\n"
        "from provisioner.threads import in_worker\n"
        "async def main():\n"
        "    task = asyncio.ensure_future(in_worker(threading.Event().wait))\n"
        "    await asyncio.sleep(0.1)\n"
        "    task.cancel()\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=20, check=False)
    assert done.returncode == 0
