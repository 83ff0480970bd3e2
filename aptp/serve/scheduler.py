"""Per-expert queues and batch formation, apart from the model and the HTTP layer.

The unit of work is one image (an :class:`Item`); a request for ``n`` images puts ``n`` items into
its expert's queue and is done when all of them are. Only items with the same sampling
parameters (steps, guidance, size) share a batch.

Batch policy (``next_batch``):

1. An expert is *ready* when its queue holds ``max_batch`` compatible items (same parameters as
   its oldest item) or its oldest item has waited ``max_wait`` seconds.
2. Among ready experts the runner takes the one whose oldest item is oldest (first come, first
   served across experts), so no expert starves: every queue becomes ready after at most
   ``max_wait`` and is then ordered by age alone, however busy the others are.
3. The batch is that expert's oldest item plus the next compatible items, in arrival order, up to
   ``max_batch``.

Backpressure: at most ``queue_limit`` images wait across all queues; a request that would pass
it is refused (:class:`QueueFull`, HTTP 429) rather than queued. Cancelled requests (timed out,
client gone) have their waiting items dropped; items already in a running batch finish and their
images are discarded.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable


class QueueFull(Exception):
    """The queues hold ``queue_limit`` images already."""


class ShuttingDown(Exception):
    """The scheduler no longer accepts work."""


@dataclass(eq=False)
class Request:
    """One generation request: ``len(prompts)`` images for one expert with one parameter set."""

    expert: int | None  # None = the full teacher
    params: Hashable  # what a batch must share (steps, guidance, height, width)
    prompts: list[str]
    seeds: list[int]
    on_done: Callable[["Request"], None] = lambda r: None
    arrived: float = field(default_factory=time.monotonic)
    results: list[Any] = field(default_factory=list)
    error: BaseException | None = None
    cancelled: bool = False
    _left: int = 0

    def __post_init__(self) -> None:
        self.results = [None] * len(self.prompts)
        self._left = len(self.prompts)


@dataclass(eq=False)
class Item:
    request: Request
    index: int  # image index within the request
    enqueued: float
    order: int  # global arrival order (ties in time)

    @property
    def prompt(self) -> str:
        return self.request.prompts[self.index]

    @property
    def seed(self) -> int:
        return self.request.seeds[self.index]


@dataclass
class Batch:
    expert: int | None
    params: Hashable
    items: list[Item]


class BatchScheduler:
    """Thread-safe: the HTTP layer calls ``submit`` / ``cancel``, the runner ``next_batch`` / ``finish``."""

    def __init__(self, max_batch: int, max_wait: float, queue_limit: int, clock: Callable[[], float] = time.monotonic):
        if max_batch < 1 or max_wait < 0 or queue_limit < 1:
            raise ValueError("max_batch >= 1, max_wait >= 0 and queue_limit >= 1")
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.queue_limit = queue_limit
        self.clock = clock
        self._queues: dict[int | None, deque[Item]] = {}
        self._pending = 0  # live (not cancelled) items waiting
        self._cond = threading.Condition()
        self._closed = False
        self._order = itertools.count()

    # -- the HTTP side -------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue ``req``'s images; raises :class:`QueueFull` or :class:`ShuttingDown`."""
        with self._cond:
            if self._closed:
                raise ShuttingDown()
            if self._pending + len(req.prompts) > self.queue_limit:
                raise QueueFull()
            now = self.clock()
            q = self._queues.setdefault(req.expert, deque())
            for i in range(len(req.prompts)):
                q.append(Item(req, i, now, next(self._order)))
            self._pending += len(req.prompts)
            self._cond.notify_all()

    def cancel(self, req: Request) -> None:
        """Drop ``req``'s waiting images (a running batch still finishes; its images are discarded)."""
        with self._cond:
            if req.cancelled:
                return
            req.cancelled = True
            q = self._queues.get(req.expert)
            if q:
                kept = deque(it for it in q if it.request is not req)
                self._pending -= len(q) - len(kept)
                self._queues[req.expert] = kept
            self._cond.notify_all()

    def depths(self) -> dict[int | None, int]:
        with self._cond:
            return {k: len(q) for k, q in self._queues.items()}

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending

    def close(self) -> None:
        """Accept nothing more; ``next_batch`` drains what is queued, then returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- the runner side -----------------------------------------------------------------------
    def _ready(self, now: float) -> tuple[int | None, Item] | None:
        best: tuple[int | None, Item] | None = None
        for k, q in self._queues.items():
            if not q:
                continue
            head = q[0]
            full = sum(1 for it in itertools.islice(q, 0, None) if it.request.params == head.request.params)
            # when closed, everything is ready: drain without waiting
            if full >= self.max_batch or now - head.enqueued >= self.max_wait or self._closed:
                if best is None or (head.enqueued, head.order) < (best[1].enqueued, best[1].order):
                    best = (k, head)
        return best

    def _next_deadline(self) -> float | None:
        heads = [q[0].enqueued + self.max_wait for q in self._queues.values() if q]
        return min(heads) if heads else None

    def take(self, now: float | None = None) -> Batch | None:
        """The next batch by the policy above, or None if no expert is ready (never blocks)."""
        with self._cond:
            return self._take(self.clock() if now is None else now)

    def _take(self, now: float) -> Batch | None:
        pick = self._ready(now)
        if pick is None:
            return None
        k, head = pick
        q = self._queues[k]
        items, rest = [], deque()
        for it in q:
            if len(items) < self.max_batch and it.request.params == head.request.params:
                items.append(it)
            else:
                rest.append(it)
        self._queues[k] = rest
        self._pending -= len(items)
        return Batch(k, head.request.params, items)

    def next_batch(self, poll: float = 0.5) -> Batch | None:
        """Block until a batch is ready and return it; None once closed and drained."""
        with self._cond:
            while True:
                now = self.clock()
                batch = self._take(now)
                if batch is not None:
                    return batch
                if self._closed and self._pending == 0:
                    return None
                deadline = self._next_deadline()
                wait = poll if deadline is None else max(0.0, min(poll, deadline - now))
                self._cond.wait(wait if wait > 0 else 0.001)

    @staticmethod
    def finish(batch: Batch, images: list[Any] | None = None, error: BaseException | None = None) -> None:
        """Hand a batch's images (in item order) or its error to the requests; call ``on_done``
        for every request whose last image this was (cancelled requests are skipped)."""
        done: list[Request] = []
        for n, it in enumerate(batch.items):
            req = it.request
            if error is not None:
                req.error = error
            else:
                req.results[it.index] = images[n]
            req._left -= 1
            if (req._left == 0 or error is not None) and req not in done:
                done.append(req)
        for req in done:
            if not req.cancelled:
                req.on_done(req)
