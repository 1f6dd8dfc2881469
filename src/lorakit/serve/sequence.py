"""What a caller of the engine holds for one submitted sequence: its events as they come (from a thread or from
asyncio), its result at the end, and a way to cancel it.

    handle = engine.submit(prompt_ids, target, params)
    for event in handle.events(): ...          # blocking, for threads
    async for event in handle.aevents(): ...   # for the app's event loop: never blocks it
    handle.result                              # after the last event: text, token_ids, finish_reason, ...

The engine thread pushes events; each consumer reads them all from the first (several consumers may read the
same handle). An asyncio consumer gets its own asyncio.Queue fed through loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass
class TokenEvent:
    """One step of one sequence: a new token and the text it made visible."""

    text: str  # new text since the last event (may be "": held back for a stop string or a partial character)
    token_id: int | None  # the new token (None on an event that only finishes the sequence)
    finished: bool  # the last event of the sequence
    finish_reason: str | None = None  # on the last event: "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # with finish_reason "error": what went wrong
    status: int | None = None  # with "error": the HTTP status the request's failure deserves (None: the server's, 500)


@dataclass
class SequenceResult:
    """A finished sequence."""

    text: str  # the whole new text (what the events carried, joined); ends before a stop string
    token_ids: list[int] = field(default_factory=list)  # every generated token (an eos included)
    finish_reason: str = "stop"  # "stop" (eos or a stop string) | "length" | "cancelled" | "error"
    error: str | None = None  # with "error": the message

    @property
    def completion_tokens(self) -> int:
        """The number of generated tokens (OpenAI's usage.completion_tokens)."""
        return len(self.token_ids)


class SequenceHandle:
    """One submitted sequence as its submitter sees it. Thread-safe."""

    def __init__(self, seq_id: str, served: str, prompt_tokens: int,
                 on_cancel: Callable[[], None] | None = None) -> None:
        self.id = seq_id  # unique per engine
        self.served = served  # Target.served: the model name to report back
        self.prompt_tokens = prompt_tokens
        self._cond = threading.Condition()
        self._events: list[TokenEvent] = []
        self._watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[TokenEvent]]] = []
        self._result: SequenceResult | None = None
        self._cancel_requested = False
        self._on_cancel = on_cancel  # the engine's: wakes its loop so the slot is freed at the next step

    # -- the consumer side --------------------------------------------------------------------------------
    @property
    def result(self) -> SequenceResult | None:
        """The finished sequence, or None while it runs."""
        with self._cond:
            return self._result

    @property
    def finished(self) -> bool:
        """Whether the last event was sent."""
        return self.result is not None

    def cancel(self) -> None:
        """Stop generating (the client went away): the engine frees the slot at its next step and the sequence
        ends with finish_reason "cancelled". No effect on a finished sequence."""
        with self._cond:
            if self._result is not None or self._cancel_requested:
                return
            self._cancel_requested = True
        if self._on_cancel is not None:
            self._on_cancel()

    @property
    def cancel_requested(self) -> bool:
        """Whether cancel() was called."""
        with self._cond:
            return self._cancel_requested

    def wait(self, timeout: float | None = None) -> SequenceResult:
        """Block until the sequence finishes; its result.

        Raises:
            TimeoutError: it did not finish within `timeout` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._result is not None, timeout):
                raise TimeoutError(f"sequence {self.id} did not finish within {timeout} s")
            assert self._result is not None
            return self._result

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Every event of the sequence, from the first, blocking until each arrives (for threads).

        Raises:
            TimeoutError: no event came for `timeout` seconds.
        """
        for index in itertools.count():
            with self._cond:
                if not self._cond.wait_for(lambda i=index: len(self._events) > i, timeout):  # type: ignore[misc]
                    raise TimeoutError(f"sequence {self.id}: no event for {timeout} s")
                event = self._events[index]
            yield event
            if event.finished:
                return

    async def aevents(self) -> AsyncIterator[TokenEvent]:
        """Every event of the sequence, from the first, for asyncio: the engine thread hands each event to this
        loop with call_soon_threadsafe, so waiting never blocks the loop. Leaving the iteration before the last
        event (the consumer's task was cancelled: the client went away) cancels the sequence."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        watcher = (loop, queue)
        with self._cond:
            backlog = list(self._events)
            self._watchers.append(watcher)
        done = False
        try:
            for event in backlog:
                done = event.finished
                yield event
                if done:
                    return
            while not done:
                event = await queue.get()
                done = event.finished
                yield event
        finally:
            with self._cond:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)
            if not done:
                self.cancel()

    # -- the engine side ----------------------------------------------------------------------------------
    def deliver(self, event: TokenEvent, result: SequenceResult | None = None) -> None:
        """Record `event` (with the result when it is the last) and wake every consumer. Called by the engine
        thread only; nothing is recorded after the last event."""
        with self._cond:
            if self._result is not None:
                return
            self._events.append(event)
            if event.finished:
                self._result = result
            self._cond.notify_all()
            watchers = list(self._watchers)
        for loop, queue in watchers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # that consumer's loop is closed: nobody is listening there any more
                pass
