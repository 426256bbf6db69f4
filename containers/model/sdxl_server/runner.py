"""One generation at a time per pipeline, a bounded queue in front of it, and a per-request time limit."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sdxl_server.errors import QueueFull, TimeLimitExceeded

T = TypeVar("T")
Work = Callable[[Callable[[], bool]], T]  # receives should_stop(); returns the result

# Before anything has run there is no measured rate: each request waiting or running is taken to last this long.
DEFAULT_SECONDS_PER_REQUEST = 1.0


@dataclass(eq=False)
class _Task(Generic[T]):
    work: Work[T]
    deadline: float
    future: asyncio.Future[T]
    cost: float
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    started: float | None = None
    cancelled: bool = False

    def should_stop(self) -> bool:
        return self.cancelled or time.monotonic() > self.deadline


@dataclass
class Runner:
    """Runs blocking work on one worker thread, in arrival order.

    At most `queue_size` requests wait behind the running one; more get QueueFull (HTTP 429) with a
    Retry-After estimated from the work queued. A request not finished `time_limit_s` after it arrived
    gets TimeLimitExceeded (HTTP 504) at once, and its work is told to stop at the next step, so the
    GPU moves on to the next request instead of finishing an image nobody will receive. A caller that
    is cancelled (its client went away) leaves the queue at once, or stops its work at the next step.
    """

    queue_size: int
    time_limit_s: float
    _queue: deque[_Task[Any]] = field(default_factory=deque)
    _running: _Task[Any] | None = None
    _wakeup: asyncio.Event | None = None
    _worker: asyncio.Task[None] | None = None
    _executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "sdxl-generate"))
    _seconds_per_cost: float | None = None  # measured on finished work

    @property
    def pending(self) -> int:
        """Requests waiting or running."""
        return len(self._queue) + (self._running is not None)

    async def run(self, work: Work[T], *, cost: float = 1.0) -> T:
        """Queue `work`, wait for its result, or raise QueueFull / TimeLimitExceeded.

        `cost` is the work's size in any unit proportional to its duration (the app uses steps x pixels
        x images); Retry-After is the cost queued times the seconds per unit measured so far.
        """
        if self.pending > self.queue_size:
            raise QueueFull(
                f"{self.pending} requests are waiting or running, the queue holds {self.queue_size}; retry later",
                retry_after=self.retry_after(),
            )
        loop = asyncio.get_running_loop()
        task: _Task[T] = _Task(work, time.monotonic() + self.time_limit_s, loop.create_future(), cost)
        self._queue.append(task)
        self._ensure_worker()
        try:
            return await asyncio.wait_for(asyncio.shield(task.future), self.time_limit_s)
        except TimeoutError:
            task.cancelled = True
            raise TimeLimitExceeded(
                f"not finished within the time limit of {self.time_limit_s:g} s (SDXL_TIME_LIMIT); "
                "use fewer steps, a smaller size or fewer images, or a dedicated endpoint with a longer limit"
            ) from None
        except asyncio.CancelledError:
            # The caller is gone: returning only once the work has stopped lets it report what ran.
            task.cancelled = True
            if task.started is not None:
                await task.ended.wait()
            raise
        finally:
            task.cancelled = True
            if task.started is None and task in self._queue:
                self._queue.remove(task)  # a slot for the next caller now, not when the worker gets here

    def retry_after(self) -> int:
        """Seconds until the work now queued or running is likely done, 1 s at least."""
        rate = self._seconds_per_cost
        if rate is None:
            return max(1, math.ceil(DEFAULT_SECONDS_PER_REQUEST * self.pending))
        left = sum(task.cost for task in self._queue if not task.cancelled) * rate
        running = self._running
        if running is not None and running.started is not None:
            left += max(0.0, running.cost * rate - (time.monotonic() - running.started))
        return max(1, math.ceil(left))

    async def close(self) -> None:
        """Stop the worker; running work finishes on its thread."""
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _ensure_worker(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        self._wakeup.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work_loop())

    def _measured(self, task: _Task[Any], seconds: float) -> None:
        """Seconds per unit of cost, weighted towards the latest (the GPU's speed does not drift much)."""
        rate = seconds / max(task.cost, 1e-9)
        previous = self._seconds_per_cost
        self._seconds_per_cost = rate if previous is None else 0.5 * previous + 0.5 * rate

    async def _work_loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            task = self._queue.popleft()
            if task.should_stop():  # timed out while waiting, or the caller left
                task.ended.set()
                continue
            self._running = task
            task.started = time.monotonic()
            try:
                result = await loop.run_in_executor(self._executor, task.work, task.should_stop)
            except Exception as exc:  # delivered to the caller, who maps it to a status code
                if not task.future.done() and not task.cancelled:
                    task.future.set_exception(exc)
            else:
                self._measured(task, time.monotonic() - task.started)
                if not task.future.done() and not task.cancelled:
                    task.future.set_result(result)
            finally:
                self._running = None
                task.ended.set()
