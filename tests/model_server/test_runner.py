"""The runner with plain blocking functions: order, queue bound, time limit, errors."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from sdxl_server.errors import QueueFull, TimeLimitExceeded
from sdxl_server.runner import Runner


def sleeper(seconds: float, log: list[str], name: str) -> Callable[[Callable[[], bool]], str]:
    def work(should_stop: Callable[[], bool]) -> str:
        log.append(f"start {name} on {threading.current_thread().name}")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if should_stop():
                log.append(f"stopped {name}")
                raise TimeLimitExceeded("stopped")
            time.sleep(0.01)
        return name

    return work


def test_work_runs_one_at_a_time_in_arrival_order() -> None:
    async def main() -> list[str]:
        runner, log = Runner(queue_size=5, time_limit_s=10), list[str]()
        results = await asyncio.gather(*(runner.run(sleeper(0.05, log, str(i))) for i in range(4)))
        await runner.close()
        assert results == ["0", "1", "2", "3"]
        return log

    log = asyncio.run(main())
    assert [entry.split()[1] for entry in log] == ["0", "1", "2", "3"]
    assert all("sdxl-generate" in entry for entry in log)


def test_a_full_queue_answers_queue_full_with_retry_after() -> None:
    async def main() -> list[str | BaseException]:
        runner, log = Runner(queue_size=1, time_limit_s=10), list[str]()
        outcomes = await asyncio.gather(
            *(runner.run(sleeper(0.2, log, str(i))) for i in range(4)), return_exceptions=True
        )
        await runner.close()
        return outcomes

    outcomes = asyncio.run(main())
    assert outcomes[:2] == ["0", "1"]
    assert all(isinstance(o, QueueFull) and o.retry_after and o.retry_after >= 1 for o in outcomes[2:])


def test_over_the_limit_answers_at_the_limit_and_stops_the_work() -> None:
    async def main() -> tuple[list[str], list[str]]:
        runner, log = Runner(queue_size=2, time_limit_s=0.3), list[str]()
        with pytest.raises(TimeLimitExceeded):
            await runner.run(sleeper(5, log, "slow"))
        answered = list(log)  # what the work had done when the caller got its answer
        runner.time_limit_s = 5
        await runner.run(sleeper(0.01, log, "next"))
        await runner.close()
        return answered, log

    answered, log = asyncio.run(main())
    # The work stopped at its next check after the limit (had it run on, the next request would still
    # start after it: only the log line tells them apart). Whether the answer or the stop came first is a
    # race between the loop and the worker thread, so `answered` is checked only for having started.
    assert answered[0].startswith("start slow")
    assert [entry.split(" on ")[0] for entry in log] == ["start slow", "stopped slow", "start next"]


def test_an_error_in_the_work_reaches_the_caller_and_the_runner_goes_on() -> None:
    def broken(should_stop: Callable[[], bool]) -> str:
        raise RuntimeError("CUDA out of memory")

    async def main() -> str:
        runner = Runner(queue_size=2, time_limit_s=5)
        with pytest.raises(RuntimeError, match="out of memory"):
            await runner.run(broken)
        result = await runner.run(lambda should_stop: "fine")
        await runner.close()
        return result

    assert asyncio.run(main()) == "fine"


def blocker(release: threading.Event, log: list[str]) -> Callable[[Callable[[], bool]], str]:
    def work(should_stop: Callable[[], bool]) -> str:
        while not release.wait(0.01):
            if should_stop():
                log.append("stopped")
                raise TimeLimitExceeded("stopped")
        return "released"

    return work


def test_retry_after_follows_the_work_queued_not_a_mean_of_past_durations() -> None:
    """Big requests measured, then small ones queued: the queue drains at once, Retry-After says 1 s."""

    async def main() -> tuple[int, int]:
        runner, log, release = Runner(queue_size=2, time_limit_s=30), list[str](), threading.Event()
        await runner.run(sleeper(0.3, log, "big"), cost=1000)  # about 0.0003 s per unit from now on
        running = asyncio.ensure_future(runner.run(blocker(release, log), cost=1))
        small = [asyncio.ensure_future(runner.run(lambda stop: "small", cost=1)) for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(QueueFull) as after_small:
            await runner.run(lambda stop: "refused", cost=1)
        release.set()
        await asyncio.gather(running, *small)
        release.clear()
        running = asyncio.ensure_future(runner.run(blocker(release, log), cost=1))
        large = [asyncio.ensure_future(runner.run(lambda stop: "large", cost=100_000)) for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(QueueFull) as after_large:
            await runner.run(lambda stop: "refused", cost=1)
        release.set()
        await asyncio.gather(running, *large)
        await runner.close()
        return int(after_small.value.retry_after or 0), int(after_large.value.retry_after or 0)

    small, large = asyncio.run(main())
    assert small == 1
    # 200,000 units queued at the measured rate: tens of seconds, in proportion to the work.
    assert large > 10 * small


def test_a_caller_that_leaves_frees_its_queue_slot_at_once() -> None:
    async def main() -> tuple[int, str]:
        runner, log, release = Runner(queue_size=1, time_limit_s=30), list[str](), threading.Event()
        running = asyncio.ensure_future(runner.run(blocker(release, log)))
        queued = asyncio.ensure_future(runner.run(lambda stop: "never"))
        await asyncio.sleep(0.05)
        queued.cancel()  # its client disconnected
        await asyncio.gather(queued, return_exceptions=True)
        pending = runner.pending
        late = asyncio.ensure_future(runner.run(lambda stop: "late"))  # would be QueueFull if the slot stayed taken
        release.set()
        await running
        result = await late
        await runner.close()
        return pending, result

    assert asyncio.run(main()) == (1, "late")


def test_a_cancelled_caller_returns_once_its_running_work_has_stopped() -> None:
    async def main() -> tuple[list[str], str]:
        runner, log, release = Runner(queue_size=2, time_limit_s=30), list[str](), threading.Event()
        running = asyncio.ensure_future(runner.run(blocker(release, log)))
        await asyncio.sleep(0.05)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        seen = list(log)  # the work had stopped when the caller's cancellation completed
        after = await runner.run(lambda stop: "next")
        await runner.close()
        return seen, after

    assert asyncio.run(main()) == (["stopped"], "next")
