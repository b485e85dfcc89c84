"""Backend traffic off the ioreq path.

The service loop answers every guest's ioreqs on one thread; a vhost-user backend
can take seconds to answer, or never answer. So each device's vhost-user exchanges
run on that device's own `BackendWorker` thread, in the order they were submitted,
and their results come back to the service loop through a `Mailbox`. A stuck
backend then holds only its own worker (and, for a bounded time, the one vCPU
whose access waits for it); every other device and guest keeps being served.

The worker also watches the idle connection: vhost-user backends speak only when
asked, so a readable socket between exchanges means the backend hung up.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from xvf.hotpath._ioreq import ServiceLoop

log = logging.getLogger("xvf.worker")

Job = Callable[[], Any]
Done = Callable[[Any, BaseException | None], None]


class Mailbox:
    """Runs callables on the service-loop thread, posted from any thread."""

    def __init__(self, loop: ServiceLoop) -> None:
        self.loop = loop
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._items: deque[Callable[[], None]] = deque()
        loop.add_reader(self._fd, self._drain)

    def post(self, fn: Callable[[], None]) -> None:
        self._items.append(fn)  # deque.append is atomic: no lock needed
        try:
            os.eventfd_write(self._fd, 1)
        except OSError:  # closed: the daemon is stopping
            pass

    def _drain(self) -> None:
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass
        while self._items:
            fn = self._items.popleft()
            try:
                fn()
            except Exception:  # xvf's own bug: keep serving everyone else
                log.exception("callback from a backend worker failed")

    def close(self) -> None:
        fd, self._fd = self._fd, -1  # a post() from now on writes nothing
        self.loop.remove_fd(fd)
        os.close(fd)


class BackendWorker:
    """One device's thread for vhost-user exchanges, run in submission order."""

    def __init__(self, label: str, mailbox: Mailbox) -> None:
        self.label = label
        self.mailbox = mailbox
        self._jobs: deque[tuple[Job, Done | None] | None] = deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._watched: tuple[int, Callable[[], None]] | None = None
        self.busy_since: float | None = None  # monotonic start of the running job
        # _wake is closed by the thread when it ends; _ran counts jobs the thread has
        # finished running, equal to _submitted when it touches nothing any more.
        self._cond = threading.Condition()
        self._ended = False
        self._submitted = 0
        self._ran = 0
        self._thread = threading.Thread(target=self._run, name=f"xvf {label}", daemon=True)
        self._thread.start()

    def submit(self, job: Job, done: Done | None = None) -> None:
        """Run `job()` on the worker; then `done(result, error)` on the loop thread."""
        with self._cond:
            if self._ended:
                raise RuntimeError(f"{self.label}: backend worker has ended")
            self._submitted += 1
            self._jobs.append((job, done))
            os.eventfd_write(self._wake, 1)

    @property
    def idle(self) -> bool:
        """Nothing running or queued: what jobs read (guest memory...) may be freed now.
        (Their done callbacks may still wait in the mailbox.)"""
        return self._submitted == self._ran

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` for idle. Only once nothing it runs can block on a
        backend (its socket shut down): the caller is the service loop."""
        with self._cond:
            return self._cond.wait_for(lambda: self._submitted == self._ran, timeout)

    def watch(self, fd: int, on_hangup: Callable[[], None]) -> None:
        """From a job: while idle, post `on_hangup` once if `fd` becomes readable."""
        self._watched = (fd, on_hangup)

    def unwatch(self) -> None:
        """Stop watching (the connection is about to close): from a job, or from the
        loop thread while the worker is idle."""
        self._watched = None

    def stop(self) -> None:
        """Run what was submitted, then end the thread (never waits for it)."""
        with self._cond:
            if not self._ended:
                self._jobs.append(None)
                os.eventfd_write(self._wake, 1)

    @property
    def stuck_for(self) -> float:
        """Seconds the current job has run (0 when idle)."""
        since = self.busy_since
        return 0.0 if since is None else time.monotonic() - since

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        watched_fd = -1
        try:
            while True:
                watched = self._watched  # one read: the loop thread may clear it
                want = watched[0] if watched is not None else -1
                if want != watched_fd:
                    if watched_fd >= 0:
                        poller.unregister(watched_fd)
                    if want >= 0:
                        poller.register(want, select.POLLIN)
                    watched_fd = want
                events = dict(poller.poll())
                if self._wake in events:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                if not self._jobs and watched_fd >= 0 and watched_fd in events:
                    watched, self._watched = self._watched, None
                    if watched is not None and watched[0] == watched_fd:
                        self.mailbox.post(watched[1])
                    continue
                while self._jobs:
                    item = self._jobs.popleft()
                    if item is None:
                        return
                    self._run_job(*item)
        except BaseException:  # xvf's own bug: say it; submit() refuses from now on
            log.exception("%s: backend worker failed", self.label)
        finally:
            with self._cond:
                self._ended = True
                os.close(self._wake)
                self._cond.notify_all()

    def _run_job(self, job: Job, done: Done | None) -> None:
        self.busy_since = time.monotonic()
        try:
            result, error = job(), None
        except BaseException as exc:  # reported to `done`, on the loop thread
            # Without its traceback: the frames would keep views of guest memory alive.
            result, error = None, exc.with_traceback(None)
        finally:
            self.busy_since = None
            with self._cond:
                self._ran += 1
                self._cond.notify_all()
        if done is not None:
            self.mailbox.post(lambda: done(result, error))
