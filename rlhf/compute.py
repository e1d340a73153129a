"""One thread for all of a service's model work: loading, generating, scoring, applying weights.

A gRPC server runs each call on whichever of its worker threads is free. Doing the model work
right there costs twice on a CPU:

- torch's CPU kernels run on an OpenMP thread team, and libgomp keeps one team for every thread
  that ever opened a parallel region. Handlers on eight worker threads grow eight teams; once
  more team threads exist than cores, libgomp stops spin-waiting between parallel regions, and
  every one of the thousands of small kernels in a decoding loop pays a futex wake-up.
  Measured (2 cores, 2 torch threads, the default policy, 8 prompts x 20 new tokens): 2.2-2.6 s
  on the only thread that had run torch; 2.8-3.9 s on every thread, that one included, as soon
  as a second thread had.
- The calls would need a lock anyway (one model, one set of weights), and a lock handed from one
  worker thread to the next wakes a different thread, with cold caches, for every call.

So a service submits its model work to a ComputeThread: one long-lived thread, one job at a
time, in submission order. Load the model on it too, or the loading thread's team stays behind.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    """Runs submitted functions one at a time, in order, on one daemon thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple, dict, Future] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        # A daemon: a job stuck in a model must not keep the process alive after SIGTERM's grace.
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """Queues fn(*args, **kwargs); its Future gets the result or the exception."""
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")
        future: Future[T] = Future()
        self._jobs.put((fn, args, kwargs, future))
        return future

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """submit() and wait: fn's result, or fn's exception raised here."""
        return self.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """Lets queued jobs finish, then ends the thread (not waiting for it)."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, kwargs, future = job
            del job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as err:  # noqa: BLE001 - the waiting caller re-raises it
                    future.set_exception(err)
            del fn, args, kwargs, future  # drop the job's references before waiting for the next
            # Hand the GIL to the thread waiting on that Future now, so that it answers its call
            # before the next queued job starts. Without this it waits for the next forced
            # switch (sys.getswitchinterval(), 5 ms): measured, a median 2.7 ms added to every
            # Score answer while calls are queued (64 VADER texts per call).
            time.sleep(0)
