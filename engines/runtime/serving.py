"""The runtime as a thread-safe serving engine (triton_repo/serving_api.py's `Server`).

One background thread owns the `runtime.Scheduler` (engines/runtime/scheduler.py) and runs its steps; request threads hand requests
and cancellations to it through a queue and read their deltas from a queue of their own, so many
requests (Triton's decoupled model serves each on its own thread) batch together continuously.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

from .requests import Delta, GenerationParams
from .scheduler import Scheduler

_CLOSE = object()
MAX_FAILED_STEPS = 3  # consecutive steps whose shared work raised before the engine reports not ready


class ThreadedServer:
    def __init__(self, engine: Scheduler):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._outboxes: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._error: RuntimeError | None = None  # set when the engine thread died
        self._thread = threading.Thread(target=self._loop, name="nemo3-engine", daemon=True)
        self._thread.start()

    def stream(self, prompt: str | list[int], params: GenerationParams, request_id: str) -> Iterator[Delta]:
        outbox: queue.Queue = queue.Queue()
        with self._lock:
            if self._error is not None:
                raise self._error
            if request_id in self._outboxes:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._outboxes[request_id] = outbox
        self._inbox.put(("add", prompt, params, request_id))
        finished = False
        try:
            while not finished:
                item = outbox.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer went away mid-stream: free the request's slot
                self.cancel(request_id)

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            known = request_id in self._outboxes
        if known:
            self._inbox.put(("cancel", request_id))
        return known

    def ready(self) -> bool:
        """False once the engine cannot serve: its thread stopped, its last MAX_FAILED_STEPS steps all failed (a
        broken device, not a bad request), or its executor can no longer run (a tensor-parallel rank exited or
        hung); Triton's model readiness reports this."""
        return (self._thread.is_alive() and self._error is None and self.engine.failed_steps < MAX_FAILED_STEPS
                and self.engine.executor.failure() is None)

    def close(self) -> None:
        self._inbox.put(_CLOSE)
        self._thread.join(timeout=30)
        self.engine.executor.close()

    def _loop(self) -> None:
        try:
            self._steps()
        except Exception as e:  # a failing engine must not leave streams waiting forever
            logging.getLogger("nemo3").exception("the engine thread stopped")
            with self._lock:
                self._error = RuntimeError(f"nemo3 engine stopped: {type(e).__name__}: {e}")
                outboxes, self._outboxes = self._outboxes, {}
            for outbox in outboxes.values():
                outbox.put(self._error)

    def _steps(self) -> None:
        while True:
            # block only when idle; otherwise take what arrived and run a step
            items = [self._inbox.get()] if not self.engine.has_work() else []
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is _CLOSE:
                    for rid in list(self._outboxes):
                        self.engine.cancel(rid)
                    self._deliver(self.engine.step())
                    return
                self._handle(item)
            if self.engine.has_work():
                self._deliver(self.engine.step())

    def _handle(self, item) -> None:
        if item[0] == "add":
            _, prompt, params, request_id = item
            try:
                self.engine.add_request(prompt, params, request_id)
            except Exception as e:  # noqa: BLE001 - a bad request: its caller's stream raises, the engine serves on
                self._send(request_id, e if isinstance(e, ValueError) else ValueError(f"{type(e).__name__}: {e}"))
        else:
            self.engine.cancel(item[1])

    def _deliver(self, deltas: list[Delta]) -> None:
        for delta in deltas:
            self._send(delta.request_id, delta)

    def _send(self, request_id: str, item) -> None:
        with self._lock:
            outbox = self._outboxes.get(request_id)
            if outbox is not None and (isinstance(item, BaseException) or item.finished):
                del self._outboxes[request_id]
        if outbox is not None:
            outbox.put(item)
