"""Dynamic batching for the web service: requests that meet in the queue run as one model call.

Each request decodes its own upload (in a worker thread, where a bad file fails that request
only), then joins a queue; one batch at a time is taken from it and run in a worker thread. A
batch starts at once when it is full (``max_size``), when no other request is still decoding
(a lone client never waits), or when its first request has waited ``wait_s``; while a batch
runs the next one gathers, so the batch size follows the load. Results go back to each request
in order. If a whole batch fails, its items are retried one by one, so one item that breaks
the model call fails only its own request. A request that finds the batcher idle (nothing
queued, running or decoding) may run ``solo``: its whole work in one call, as without
batching, while the requests that arrive meanwhile gather for the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741  (item)
O = TypeVar("O")  # noqa: E741  (result)

DEFAULT_BATCH_MAX = 16
"""Most uploads one model call of the service takes (1 turns batching off)."""
DEFAULT_BATCH_WAIT_MS = 5.0
"""Longest a decoded upload waits for others to share its model call (none when no other
request is decoding: a lone client never waits)."""

RunInThread = Callable[[Callable[[], Any]], Awaitable[Any]]


@dataclass
class _Queue:
    """One event loop's share of the batcher (a test client may run several loops)."""

    pending: list[tuple[Any, asyncio.Future[Any], float]] = field(default_factory=list)
    coming: int = 0
    """Requests that will join soon (still decoding)."""
    busy: bool = False
    timer: asyncio.TimerHandle | None = None


class Batcher(Generic[I, O]):
    """Groups items into calls of ``run_batch(items) -> results`` (one result per item, in
    order), at most ``max_size`` items and ``wait_s`` of waiting per call; ``run_in_thread``
    runs a blocking call off the event loop (e.g. :func:`anyio.to_thread.run_sync`)."""

    def __init__(self, run_batch: Callable[[Sequence[I]], Sequence[O]], *, max_size: int, wait_s: float,
                 run_in_thread: RunInThread) -> None:
        if max_size < 1:
            raise ValueError(f"batch max size must be at least 1, got {max_size}")
        if not 0 <= wait_s <= 1:
            raise ValueError(f"batch wait must be between 0 and 1000 ms, got {1000 * wait_s:g} ms")
        self.run_batch = run_batch
        self.max_size = max_size
        self.wait_s = wait_s
        self._run_in_thread = run_in_thread
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue] = (
            weakref.WeakKeyDictionary())
        self.batches = 0
        self.items = 0
        self.solo = 0

    def _queue(self) -> _Queue:
        loop = asyncio.get_running_loop()
        if loop not in self._queues:
            self._queues[loop] = _Queue()
        return self._queues[loop]

    async def run(self, prepare: Callable[[], Awaitable[I]],
                  solo: Callable[[], Awaitable[O]] | None = None) -> O:
        """Await ``prepare()`` (the item: e.g. a decode in a worker thread; its error is this
        request's alone), then the item's result from a batch; or, when the batcher is idle,
        ``solo()`` (the same result in one step) while later requests queue behind it."""
        queue = self._queue()
        if solo is not None and not (queue.busy or queue.pending or queue.coming):
            queue.busy = True
            self.solo += 1
            try:
                return await solo()
            finally:
                queue.busy = False
                self._schedule(queue)
        queue.coming += 1
        try:
            item = await prepare()
        finally:
            queue.coming -= 1
        future: asyncio.Future[O] = asyncio.get_running_loop().create_future()
        queue.pending.append((item, future, time.monotonic()))
        self._schedule(queue)
        try:
            return await future
        finally:
            self._schedule(queue)  # a request that gave up still lets the others go on

    def _schedule(self, queue: _Queue) -> None:
        queue.pending = [p for p in queue.pending if not p[1].done()]
        if queue.busy or not queue.pending:
            return
        due = queue.pending[0][2] + self.wait_s
        if len(queue.pending) >= self.max_size or queue.coming == 0 or time.monotonic() >= due:
            if queue.timer is not None:
                queue.timer.cancel()
                queue.timer = None
            batch, queue.pending = queue.pending[:self.max_size], queue.pending[self.max_size:]
            queue.busy = True
            asyncio.get_running_loop().create_task(self._run(queue, batch))
        elif queue.timer is None:
            loop = asyncio.get_running_loop()
            queue.timer = loop.call_at(loop.time() + max(0.0, due - time.monotonic()),
                                       self._fire, queue)

    def _fire(self, queue: _Queue) -> None:
        queue.timer = None
        self._schedule(queue)

    async def _run(self, queue: _Queue, batch: list[tuple[Any, asyncio.Future[Any], float]]) -> None:
        try:
            items = [b[0] for b in batch]
            try:
                results = await self._run_in_thread(lambda: list(self.run_batch(items)))
                if len(results) != len(items):
                    raise RuntimeError(f"run_batch gave {len(results)} results for {len(items)} items")
                outcomes: list[tuple[Any, BaseException | None]] = [(r, None) for r in results]
            except Exception as exc:
                if len(items) == 1:
                    outcomes = [(None, exc)]
                else:  # find the item that breaks the call: the others still get their answer
                    log.warning("a batch of %d failed (%s: %s); running its items one by one",
                                len(items), type(exc).__name__, exc)
                    outcomes = []
                    for item in items:
                        try:
                            outcomes.append((await self._run_in_thread(
                                lambda it=item: self.run_batch([it])[0]), None))
                        except Exception as one_exc:
                            outcomes.append((None, one_exc))
            self.batches += 1
            self.items += len(items)
            for (_, future, _), (result, error) in zip(batch, outcomes, strict=True):
                if future.done():  # the request was cancelled (client gone)
                    continue
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)
        except BaseException as exc:  # cancelled: every waiting request must hear of it
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            raise
        finally:
            queue.busy = False
            self._schedule(queue)


__all__ = ["DEFAULT_BATCH_MAX", "DEFAULT_BATCH_WAIT_MS", "Batcher"]
