"""The engine behind the server: one background thread runs LLMEngine.step(); the event loop only enqueues.

LLMEngine is not thread-safe, so the step thread is the only one that touches it. The event loop adds and aborts
requests through a locked inbox that the step thread drains between steps, and receives outputs through
loop.call_soon_threadsafe. Outputs are cumulative, so a request's stream keeps only the newest one: a slow reader
skips intermediate states instead of piling them up. When idle, the thread sleeps on an Event.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmserve.engine.config import EngineConfig
from lmserve.engine.llm_engine import LLMEngine, PromptInput
from lmserve.engine.request_stream import (
    EngineDeadError,
    EngineNotReadyError,
    OutputObserver,
    QueueFullError,
    RequestAbortedError,
    RequestStream,
)
from lmserve.engine.stats import EngineStats
from lmserve.sampling_params import SamplingParams

logger = logging.getLogger("lmserve.engine")


@dataclass
class _Inbox:
    adds: list[tuple[RequestStream, dict[str, Any]]] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)


class AsyncEngine:
    """Runs an LLMEngine (loaded in the step thread from `config`, or given ready-made) for an asyncio server."""

    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None,
                 max_waiting_requests: int | None = None, observer: OutputObserver | None = None) -> None:
        if (config is None) == (engine is None):
            raise ValueError("give exactly one of config and engine")
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be at least 1, got {max_waiting_requests}")
        self.config = config or engine.config
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.observer = observer
        self.on_dead: Callable[[BaseException | None], None] | None = None  # called from the step thread
        self.error: BaseException | None = None   # why the engine died
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._inbox = _Inbox()
        self._stopping = False
        self._dead = False
        self._stats: EngineStats | None = None
        self._streams: dict[str, RequestStream] = {}      # step thread only

    # ---- event-loop side -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the step thread (loading the model first if a config was given); call from the event loop."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lmserve-step", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._dead

    @property
    def dead(self) -> bool:
        """True once the step loop has stopped or is stopping (a failure, or shutdown)."""
        return self._dead or self._stopping

    @property
    def stats(self) -> EngineStats | None:
        """The snapshot taken after the last step (None until the model is loaded)."""
        return self._stats

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams, priority: int = 0,
                    cache_salt: str | None = None) -> RequestStream:
        """Queue a request without blocking; `await stream.accepted()` to learn whether the engine took it."""
        return self.add_requests([(request_id, prompt, params, priority, cache_salt)])[0]

    def add_requests(self, requests: list[tuple[str, PromptInput, SamplingParams, int, str | None]]
                     ) -> list[RequestStream]:
        """Queue several requests all-or-nothing under max_waiting_requests."""
        arrival = time.monotonic()
        streams = [RequestStream(r[0]) for r in requests]
        with self._lock:
            self._check_admission(len(requests))
            for stream, (request_id, prompt, params, priority, cache_salt) in zip(streams, requests, strict=True):
                self._inbox.adds.append((stream, dict(request_id=request_id, prompt=prompt, params=params,
                                                      priority=priority, cache_salt=cache_salt,
                                                      arrival_time=arrival)))
        self._wake.set()
        return streams

    def _check_admission(self, count: int) -> None:
        if self._dead or self._stopping:
            raise EngineDeadError(self.death_message())
        if not self._ready.is_set():
            raise EngineNotReadyError("the model is still loading")
        if self.max_waiting_requests is not None:
            waiting = len(self._inbox.adds) + (self._stats.num_requests_waiting if self._stats else 0)
            if waiting + count > self.max_waiting_requests:
                raise QueueFullError(f"the server is busy: {waiting} requests are waiting "
                                     f"(max_waiting_requests={self.max_waiting_requests}); retry later")

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it is; safe to call twice or after it finished."""
        with self._lock:
            self._inbox.aborts.append(request_id)
        self._wake.set()

    def stop(self) -> None:
        """Without blocking: abort every request (their streams get EngineDeadError) and end the step thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """stop(), then wait for the step thread (blocking: run it off the event loop)."""
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def death_message(self) -> str:
        if self._stopping:
            return "the server is shutting down"
        return f"the engine has stopped: {type(self.error).__name__}: {self.error}"

    # ---- step-thread side ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.engine is None:
                start = time.monotonic()
                self.engine = LLMEngine(self.config)
                logger.info("model %s loaded in %.1f s: max_model_len=%d, %d KV blocks of %d tokens", self.config.model,
                            time.monotonic() - start, self.engine.max_model_len,
                            self.engine.block_manager.num_blocks, self.config.block_size)
            self._stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001 - any load failure makes the engine dead, reported by /health
            logger.exception("loading the model failed")
            self._die(e)
            return
        self._ready.set()
        try:
            while self._step_once():
                pass
        except BaseException as e:  # noqa: BLE001 - a failed step kills the engine; every request gets the error
            logger.exception("the engine step failed")
            self._die(e)
            return
        self._die(None)

    def _step_once(self) -> bool:
        """Drain the inbox, run one step (or sleep while idle); False when asked to stop."""
        engine = self.engine
        deliveries: list[tuple[RequestStream, str, Any]] = []
        self._wake.clear()
        with self._lock:
            if self._stopping:
                return False
            inbox, self._inbox = self._inbox, _Inbox()
            for stream, kwargs in inbox.adds:
                self._admit(stream, kwargs, deliveries)
            for request_id in inbox.aborts:
                if engine.abort_request(request_id):
                    stream = self._streams.pop(request_id, None)
                    if stream is not None:  # whoever still waits on it wakes up
                        deliveries.append((stream, "fail", RequestAbortedError(f"request {request_id} was aborted")))
                    self._call_observer("forget", request_id)
            self._stats = engine.stats()
        self._deliver(deliveries)
        if not engine.has_unfinished_requests():
            self._wake.wait()
            return True
        outputs = engine.step()
        if not outputs:
            self._wake.wait(0.01)  # nothing could be scheduled; do not spin
        self._call_observer("observe", outputs, time.monotonic())
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if output.finished:
                self._streams.pop(output.request_id, None)
            if stream is not None:
                deliveries.append((stream, "put", output))
        with self._lock:
            self._stats = engine.stats()
        self._deliver(deliveries)
        return True

    def _admit(self, stream: RequestStream, kwargs: dict[str, Any], deliveries: list) -> None:
        request_id = kwargs["request_id"]
        try:
            self.engine.add_request(**kwargs)
        except ValueError as e:
            deliveries.append((stream, "fail", e))
            return
        except Exception as e:  # noqa: BLE001 - not the client's fault, but only this request is affected
            logger.exception("adding request %s failed", request_id)
            self.engine.abort_request(request_id)
            deliveries.append((stream, "fail", RuntimeError(f"internal error while adding the request: {e}")))
            return
        self._streams[request_id] = stream
        deliveries.append((stream, "accept", None))

    def _call_observer(self, method: str, *args) -> None:
        if self.observer is not None:
            try:
                getattr(self.observer, method)(*args)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                logger.exception("output observer failed")

    def _deliver(self, deliveries: list[tuple[RequestStream, str, Any]]) -> None:
        if deliveries:
            self._call_on_loop(_deliver_all, list(deliveries))
            deliveries.clear()

    def _call_on_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _die(self, error: BaseException | None) -> None:
        """Stop serving: every pending and running request gets EngineDeadError."""
        with self._lock:
            self.error = error
            self._dead = True
            pending = [stream for stream, _ in self._inbox.adds]
            self._inbox = _Inbox()
        streams = pending + list(self._streams.values())
        if self.engine is not None:
            for request_id in list(self._streams):
                try:
                    self.engine.abort_request(request_id)
                except Exception:  # noqa: BLE001 - already dying
                    pass
            try:
                self._stats = self.engine.stats()
            except Exception:  # noqa: BLE001
                pass
        for request_id in self._streams:
            self._call_observer("forget", request_id)
        self._streams.clear()
        self._ready.set()
        dead = EngineDeadError(self.death_message())
        self._call_on_loop(_deliver_all, [(stream, "fail", dead) for stream in streams])
        if self.on_dead is not None:
            try:
                self.on_dead(error)
            except Exception:  # noqa: BLE001
                logger.exception("on_dead callback failed")


def _deliver_all(deliveries: list[tuple[RequestStream, str, Any]]) -> None:
    for stream, kind, payload in deliveries:
        if kind == "accept":
            stream._accept()
        elif kind == "put":
            stream._put(payload)
        else:
            stream._fail(payload)
