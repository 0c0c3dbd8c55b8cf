"""The engine: one thread owns the model; requests queue, and those that arrive together run
as one batch.

`submit()` is called from the web server's event loop. It refuses at once (`QueueFull`) when
`max_queue` requests are already waiting or running, so the queue never grows without limit.
The engine thread waits for a request, then gathers others until none arrived for `gather_s`
seconds (at most `max_gather_s` in all, or until `max_batch` are waiting), and runs them with `batching.run_batch`. Text and the end of each
row travel back to the event loop with `call_soon_threadsafe`. Other work that needs the model
(the lens view, A/B scores) takes `model_lock`, so it never runs during a batch.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

from interplab.models.handle import LoadedModel
from interplab.serve.batching import Row, run_batch


class QueueFull(Exception):
    """The server already holds `max_queue` requests."""


@dataclass(eq=False)
class Ticket:
    """The event-loop side of a row: an asyncio queue of ("text", str) then ("done", None) or
    ("error", exception)."""

    row: Row
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def push(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server stopped, nobody is listening
            pass

    def cancel(self) -> None:
        """The client went away: the engine drops the row at its next step."""
        self.row.cancelled = True


class Engine:
    def __init__(self, model: LoadedModel, *, max_batch: int = 16, max_queue: int = 64,
                 gather_s: float = 0.02, max_gather_s: float = 0.25) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.gather_s, self.max_gather_s = gather_s, max(gather_s, max_gather_s)
        self.model_lock = threading.Lock()
        self.batches_run = 0
        self.largest_batch = 0
        self._pending: collections.deque[Ticket] = collections.deque()
        self._load = 0  # waiting + running
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="interplab-engine", daemon=True)
        self._thread.start()

    @property
    def load(self) -> int:
        return self._load

    def submit(self, row: Row) -> Ticket:
        """Queue a row; its text arrives on the returned ticket. Call from the event loop."""
        ticket = Ticket(row, asyncio.get_running_loop())
        row.on_text = lambda text: ticket.push("text", text)
        with self._cv:
            if self._stopped:
                raise QueueFull("the server is shutting down")
            if self._load >= self.max_queue:
                raise QueueFull(f"the server already holds {self.max_queue} requests (--max-queue); retry shortly")
            self._pending.append(ticket)
            self._load += 1
            self._cv.notify()
        return ticket

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopped = True
            for ticket in self._pending:
                ticket.row.cancelled = True
            self._cv.notify()
        self._thread.join(timeout)

    # --- the engine thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                with self.model_lock:
                    run_batch(self.model, [t.row for t in batch])
                self.batches_run += 1
                self.largest_batch = max(self.largest_batch, len(batch))
                for ticket in batch:
                    ticket.push("done", None)
            except Exception as error:  # a bug or a resource error: every row of the batch hears it
                for ticket in batch:
                    ticket.push("error", error)
            finally:
                with self._cv:
                    self._load -= len(batch)

    def _next_batch(self) -> list[Ticket] | None:
        with self._cv:
            while not self._pending and not self._stopped:
                self._cv.wait()
            if self._stopped:
                self._drain()
                return None
            # gather: wait until no request arrived for gather_s (clients of one burst rarely arrive
            # in the same millisecond), at most max_gather_s, or until the batch is full
            start = last = time.monotonic()
            seen = len(self._pending)
            while len(self._pending) < self.max_batch and not self._stopped:
                now = time.monotonic()
                left = min(last + self.gather_s, start + self.max_gather_s) - now
                if left <= 0:
                    break
                self._cv.wait(left)
                if len(self._pending) > seen:
                    seen, last = len(self._pending), time.monotonic()
            n = min(self.max_batch, len(self._pending))
            return [self._pending.popleft() for _ in range(n)]

    def _drain(self) -> None:
        while self._pending:
            ticket = self._pending.popleft()
            self._load -= 1
            ticket.push("error", QueueFull("the server is shutting down"))
