"""How the router calls the other deployments: the `Downstream` callables it is given, a deadline
per call (`call_with_timeout`), the `Coalescer` that merges concurrent calls into one, the
callee's side of a coalesced call (`answer_each`), and a `Breaker` that pauses optional calls to a
downstream that keeps failing.

Nothing here knows what is being scored: items are opaque, a call is any `DownstreamCall` (a Serve
handle method in a deployment, a local coroutine in the peer and the tests).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cotrr_ray.serving.errors import InvalidOutput

DownstreamCall = Callable[[Any], Awaitable[Any]]
"""One argument in, an awaitable out (a Serve `DeploymentResponse`, a coroutine, a future)."""


@dataclass
class Downstream:
    """How the router reaches the other deployments (handle calls in Serve, fakes in tests).

    Each callable returns an awaitable; if it also has `cancel()` (a Serve `DeploymentResponse`),
    it is cancelled when its budget runs out.
    """

    score: DownstreamCall  # CandidateList -> ScoreResult
    calibrate: DownstreamCall | None  # CalibrationInput -> (window,) probabilities; None: the scorer calibrates (fused)
    info: DownstreamCall  # None -> dict
    score_control: DownstreamCall | None = None
    info_control: DownstreamCall | None = None


async def call_with_timeout(fn: DownstreamCall, arg: Any, timeout_s: float) -> Any:
    """Await `fn(arg)` for at most `timeout_s`; cancel the downstream request on timeout.

    `asyncio.timeout` (not `wait_for`): no extra task and no extra loop iteration per call.
    """
    response = fn(arg)
    try:
        async with asyncio.timeout(timeout_s):
            return await response
    except TimeoutError:  # asyncio.TimeoutError is TimeoutError on Python >= 3.11
        cancel = getattr(response, "cancel", None)
        if callable(cancel):
            cancel()
        raise


async def answer_each(results: Awaitable[list[Any]], n: int, on_error: Callable[[Exception], Any]) -> list[Any]:
    """The callee's side of a coalesced call of `n` items: `await results` (one entry per item), or,
    if that raises, the exception as the entry of every item, reported once to `on_error`.

    Returned, not raised, because raising is the expensive way out of a Serve method: per call the
    replica logs the exception with its traceback ("Request failed."), Ray formats the traceback
    twice more into a `RayTaskError` and pickles it, and the caller unpickles that into a new dual
    exception class. A failing scorer then spent more CPU per call than scoring does, on the cores
    the control arm shares. As a value the exception pickles as its type and args, once per call
    however many items share it, and `Coalescer` fails each item with it. (One that cannot be
    pickled fails the call on the way back, which fails every item too: the old, dearer path.)
    `on_error` is where the callee logs it (rate-limited), since its traceback does not travel.
    """
    try:
        return await results
    except Exception as e:
        on_error(e)
        return [e] * n


class Breaker:
    """Pauses optional calls to a downstream after `max_failures` consecutive failures, for `pause_s`;
    then lets one call through (a probe): its success resumes, its failure pauses again.

    For the shadow scorer. A slow one costs the router little: the coalescer's in-flight cap holds
    the windows back and their timeouts drop them unsent, so a timeout only fails a probe. A failing
    one answers at once, so without this every request would still ship its window there and back,
    the whole transport cost of a healthy shadow on the cores the control arm shares, for no
    comparison at all.
    """

    def __init__(self, max_failures: int = 5, pause_s: float = 5.0, *, clock=time.monotonic):
        if max_failures < 1 or pause_s <= 0:
            raise ValueError("max_failures must be >= 1 and pause_s > 0")
        self.max_failures, self.pause_s, self._clock = max_failures, pause_s, clock
        self.failures = 0  # consecutive
        self.paused_until: float | None = None
        self._probing = False

    def allow(self) -> bool:
        """Whether to make a call now (when paused: one probe once the pause is over)."""
        if self.paused_until is None:
            return True
        if self._probing or self._clock() < self.paused_until:
            return False
        self._probing = True
        return True

    def record(self, ok: bool | None) -> bool:
        """The outcome of a call (None: it timed out); True when this failure paused the calls."""
        probe, self._probing = self._probing, False
        if ok:
            self.failures, self.paused_until = 0, None
            return False
        if ok is None and not probe:
            return False
        self.failures += 1
        if probe or self.failures >= self.max_failures:
            self.paused_until = self._clock() + self.pause_s
            return True
        return False


class Coalescer:
    """Merges concurrent one-item downstream calls into one call that carries a list.

    Every hop between deployments has a fixed cost (serialisation, the transport, Serve's request
    bookkeeping on both sides) that dwarfs the per-item work of a batched scorer or an isotonic
    table; coalescing pays it once per batch instead of once per request.

    `send_many(items)` returns an awaitable (a Serve `DeploymentResponse`) of a list with one entry
    per item; an entry that is an exception fails only its own item, an exception raised by the
    call fails them all. Calling the coalescer with one item returns an `asyncio.Future` (awaitable,
    with `cancel()`), so it drops in wherever a handle method was called per item.

    Policy, no timer: items submitted in the same event-loop iteration travel together, and while
    `max_in_flight` calls are outstanding new items wait and leave together (at most `max_items`
    per call) as soon as one returns. A lone request is sent at once and pays no batching wait;
    under load batches grow to what arrived during one downstream round trip. A cancelled item
    (its caller timed out) is never sent; a call whose items were all cancelled is cancelled.
    """

    def __init__(self, send_many: DownstreamCall, *, max_items: int = 16, max_in_flight: int = 2):
        self._send_many = send_many
        self.configure(max_items=max_items, max_in_flight=max_in_flight)
        self._pending: collections.deque[tuple[Any, asyncio.Future]] = collections.deque()
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task] = set()
        self.calls = 0  # downstream calls made
        self.items = 0  # items they carried

    def configure(self, *, max_items: int, max_in_flight: int) -> None:
        """Set the batching limits (RoutingConfig.coalesce_max_lists / coalesce_max_in_flight); invalid: nothing changes."""
        if max_items < 1 or max_in_flight < 1:
            raise ValueError("max_items and max_in_flight must be >= 1")
        self.max_items, self.max_in_flight = max_items, max_in_flight

    def __call__(self, item: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((item, fut))
        self._schedule(loop)
        return fut

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "items": self.items,
            "mean_items_per_call": round(self.items / self.calls, 3) if self.calls else None,
            "in_flight": self._in_flight,
            "pending": len(self._pending),
            "max_items": self.max_items,
            "max_in_flight": self.max_in_flight,
        }

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        while self._pending and self._in_flight < self.max_in_flight:
            batch = []
            while self._pending and len(batch) < self.max_items:
                item, fut = self._pending.popleft()
                if not fut.done():  # cancelled while waiting: never sent
                    batch.append((item, fut))
            if batch:
                self._in_flight += 1
                task = loop.create_task(self._send(batch))
                self._tasks.add(task)  # strong reference until done
                task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        futures = [f for _, f in batch]
        self.calls += 1
        self.items += len(batch)
        returned = False
        try:
            response = self._send_many([item for item, _ in batch])
            cancel = getattr(response, "cancel", None)
            if callable(cancel):

                def cancel_if_abandoned(_: asyncio.Future) -> None:
                    if not returned and all(f.done() for f in futures):
                        cancel()

                for f in futures:
                    f.add_done_callback(cancel_if_abandoned)
            results = await response
            returned = True
            if len(results) != len(batch):
                raise InvalidOutput(f"{len(results)} results for a batch of {len(batch)}")
        except asyncio.CancelledError:
            returned = True
            for f in futures:
                f.cancel()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task itself is being cancelled (shutdown)
            # otherwise every caller gave up and we cancelled the call: nothing to deliver
        except Exception as e:
            returned = True
            for f in futures:
                if not f.done():
                    f.set_exception(e)
        else:
            for f, r in zip(futures, results):
                if f.done():
                    continue
                if isinstance(r, BaseException):
                    f.set_exception(r)
                else:
                    f.set_result(r)
        finally:
            self._in_flight -= 1
            if self._pending:
                self._schedule(asyncio.get_running_loop())
