"""Runs a `dllm.Engine` in a background thread and serves it to asyncio callers (a Serve replica, the
batch job's engine actors).

The engine steps continuously while any request is in flight; callers on the event loop submit a
request and iterate its outputs (one item per committed block, the last one finished). New
requests join between steps; an abandoned iterator aborts its request, freeing its cache slot.
Other work on the model (`call`, e.g. likelihood scoring) runs on the same thread between steps,
so nothing uses the model concurrently with a step.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import dllm


@dataclass
class _Submission:
    request_id: str
    prompt_ids: list[int]
    config: dllm.GenerationConfig
    priority: int
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    submitted_at: float


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """From the engine thread: hand a `call`'s result or error to its caller's event loop."""
    future.get_loop().call_soon_threadsafe(_resolve, future, result, error)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class EngineLoop:
    def __init__(self, engine: dllm.Engine) -> None:
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._live: dict[str, _Submission] = {}
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.aborted = 0  # requests abandoned by their callers (client disconnects)
        self.on_step = None  # optional callback(stats dict) after each step, for metrics
        self._thread = threading.Thread(target=self._run, name="dllm-engine-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def in_flight(self) -> int:
        return len(self._live) + self._inbox.qsize()

    async def generate(self, prompt_ids: list[int], config: dllm.GenerationConfig,
                       priority: int = 0) -> AsyncIterator[dllm.RequestOutput]:
        """Yield the request's outputs as blocks commit; closing the iterator early aborts it."""
        if not self.alive:
            raise RuntimeError(f"the engine loop is not running: {self.error!r}")
        sub = _Submission(f"loop-{next(self._ids)}", prompt_ids, config, priority, asyncio.get_running_loop(),
                          asyncio.Queue(), time.monotonic())
        self._inbox.put(("add", sub))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await sub.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # the caller went away (client disconnect, cancellation): free the slot
                self._inbox.put(("abort", sub.request_id))
                self._wake.set()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the engine thread between two steps; return its result (or raise its error)."""
        if not self.alive:
            raise RuntimeError(f"the engine loop is not running: {self.error!r}")
        future = asyncio.get_running_loop().create_future()
        self._inbox.put(("call", (fn, future)))
        self._wake.set()
        return await future

    def shutdown(self, timeout: float = 30.0) -> None:
        """Let in-flight requests finish (up to `timeout`), then stop the thread."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline and self.alive:
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    # ----- the engine thread --------------------------------------------------------------------

    def _deliver(self, sub: _Submission, item) -> None:
        sub.loop.call_soon_threadsafe(sub.outputs.put_nowait, item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_request(payload.prompt_ids, payload.config, request_id=payload.request_id,
                                            priority=payload.priority)
                    self._live[payload.request_id] = payload
                except Exception as e:  # a request the engine refuses fails alone
                    self._deliver(payload, e)
            elif kind == "call":
                fn, future = payload
                try:
                    result, error = fn(), None
                except Exception as e:  # the caller gets it; the loop goes on
                    result, error = None, e
                _settle(future, result, error)
            elif kind == "abort" and payload in self._live:
                self.engine.abort(payload)
                self._live.pop(payload, None)
                self.aborted += 1

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    sub = self._live.get(out.request_id)
                    if sub is None:
                        continue
                    if out.finished:
                        del self._live[out.request_id]
                    self._deliver(sub, out)
                if self.on_step is not None:
                    self.on_step(self.engine.stats())
        except BaseException as e:  # the loop is dead: fail everyone waiting, let health checks see it
            self.error = e
            failure = RuntimeError(f"engine loop failed: {e!r}")
            for sub in self._live.values():
                self._deliver(sub, failure)
            self._live.clear()
            while not self._inbox.empty():  # queued work would wait forever
                kind, payload = self._inbox.get_nowait()
                if kind == "add":
                    self._deliver(payload, failure)
                elif kind == "call":
                    _settle(payload[1], None, failure)
