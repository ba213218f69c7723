"""Worker threads for blocking store and file work that never hold the process.

The daemon runs its database and file work in threads so the event loop keeps
reading AMI.  A store call can hang on the network (a lock nobody releases, a
server gone without a FIN), and a thread cannot be cancelled.  ``asyncio.to_thread``
uses the loop's default executor, whose threads ``asyncio.run`` joins without a
bound (Python 3.11) and the interpreter joins again at exit: one stuck call kept
a SIGTERM'd daemon alive until systemd killed it.  These threads are daemon
threads, never joined: a stuck one is left behind when the process exits (its
connection then closes and the server rolls its transaction back).
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from functools import partial
from typing import Any, ParamSpec, TypeVar

__all__ = ["WorkerPool", "in_worker", "start_in_worker"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: Threads at most in the shared pool: the apply, each server's registration writes
#: (two at once on PostgreSQL), a snapshot, state reads, with room to spare.
MAX_WORKERS = 16

_Item = tuple[Future[Any], Callable[[], Any]]


class WorkerPool(Executor):
    """A thread pool of daemon threads, started on demand up to ``max_workers``.

    It is an :class:`~concurrent.futures.Executor` for ``loop.run_in_executor``;
    :meth:`shutdown` never waits for a call in progress."""

    def __init__(self, max_workers: int = MAX_WORKERS, *, name: str = "provisioner-worker") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max = max_workers
        self._name = name
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        """Run ``fn(*args, **kwargs)`` in a worker thread; its future."""
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            future: Future[_T] = Future()
            self._queue.put((future, partial(fn, *args, **kwargs)))
            self._add_thread_if_none_idle()
            return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more work; idle threads end.  ``wait`` is not honoured for calls in
        progress (that is the point): they finish, or die with the process."""
        with self._lock:
            self._closed = True
            if cancel_futures:
                self._cancel_queued()
            self._queue.put(None)

    @property
    def threads(self) -> int:
        """Threads started so far (alive or not)."""
        return len(self._threads)

    def _add_thread_if_none_idle(self) -> None:
        if self._idle.acquire(blocking=False):
            return  # an idle thread takes the item
        if len(self._threads) < self._max:
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _cancel_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[0].cancel()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.put(None)  # the next thread ends too
                return
            future, call = item
            if future.set_running_or_notify_cancel():
                try:
                    result = call()
                except BaseException as exc:  # handed to the awaiting side, as a pool does
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future, call  # no reference kept while idle
            self._idle.release()


_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def _shared_pool() -> WorkerPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = WorkerPool()
        return _pool


async def in_worker(fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """``asyncio.to_thread`` on the shared :class:`WorkerPool`: ``fn`` runs in a daemon
    thread, with the caller's context variables; cancelling the await leaves it running
    to its end (or the process's)."""
    return await start_in_worker(fn, *args, **kwargs)


def start_in_worker(
    fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
) -> asyncio.Future[_T]:
    """:func:`in_worker`, handed to a thread before this returns (a coroutine is only
    when first run, which a task does in a later turn of the event loop); what learns
    its result."""
    loop = asyncio.get_running_loop()
    call = partial(contextvars.copy_context().run, partial(fn, *args, **kwargs))
    return loop.run_in_executor(_shared_pool(), call)
