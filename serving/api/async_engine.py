"""The engine in one background thread; HTTP handlers talk to it through thread-safe queues.

Handlers never block the loop: `generate` is an async iterator of RequestOutput, and leaving
it early (a client disconnect) aborts the request, which frees its blocks.
"""

import asyncio
import itertools
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from counterpoint.decoding import SamplingParams
from counterpoint.serving.engine.engine import Engine
from counterpoint.serving.api.metrics import Metrics
from counterpoint.serving.engine.outputs import RequestOutput, snapshot


class QueueFull(RuntimeError):
    """More requests are waiting than --max-queue allows."""


class Unavailable(RuntimeError):
    """The engine is still loading, shutting down, or has failed."""


class StepFailed(RuntimeError):
    """The engine could not finish this request (a step or its decoding failed); the engine goes on."""

    status, err_type = 500, "internal_error"


class ShuttingDown(StepFailed):
    """The server shut down before this request finished."""

    status, err_type = 503, "service_unavailable"


@dataclass
class _Submission:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    model: str | None
    prompt_token_ids: list[int] | None
    no_context: list[int] | None
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: Engine | Callable[[], Engine], max_queue: int | None = None,
                 metrics: Metrics | None = None, on_load_error: Callable[[BaseException], None] | None = None):
        """`engine` may be a factory: the model then loads in the loop thread while the server
        already answers (/health says 503 until it is ready). If loading fails, `on_load_error`
        gets the error (the CLI exits with it); without one, the thread raises it."""
        self.engine = engine if isinstance(engine, Engine) else None
        self._factory = None if isinstance(engine, Engine) else engine
        self._on_load_error = on_load_error
        self.max_queue = max_queue
        self.metrics = metrics
        self._inbox: queue.Queue = queue.Queue()
        self._sinks: dict[str, _Submission] = {}
        self._ids = itertools.count()
        # NOTE: each counter has one writer thread (submitted: the event loop; taken: the engine).
        self._num_submitted = self._num_taken = 0
        self._free_slots = 0  # sequence slots the default model had free after the last step
        self._stop = threading.Event()
        self._draining = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        """Loaded, looping, and taking requests."""
        return self.engine is not None and self._thread.is_alive() and self.error is None and not self._draining

    def check_available(self) -> None:
        if self.error is not None:
            raise Unavailable("the engine failed; see the server log")
        if self.engine is None:
            raise Unavailable("the model is still loading")
        if self._draining:
            raise Unavailable("the server is shutting down")

    @property
    def num_unfinished(self) -> int:
        return len(self._sinks) + self._inbox.qsize()

    async def generate(self, prompt: str | list[int], params: SamplingParams, prefix: str = "req",
                       model: str | None = None, prompt_token_ids: list[int] | None = None,
                       no_context: list[int] | None = None):
        """Yields a RequestOutput per step that advanced the request; the last one is finished.
        `model` is a served name (default: the first model); `prompt_token_ids` spare the engine
        thread from tokenizing a text prompt; `no_context` is the prompt without its documents, as
        token ids, for context contrast."""
        self.check_available()
        if self.max_queue is not None and self._num_waiting_for_room() >= self.max_queue:
            raise QueueFull(f"the server is at its queue limit ({self.max_queue} waiting requests)")
        request_id = f"{prefix}-{next(self._ids)}"
        sink: asyncio.Queue = asyncio.Queue()
        submission = _Submission(request_id, prompt, params, model, prompt_token_ids, no_context,
                                 asyncio.get_running_loop(), sink)
        self._num_submitted += 1
        self._inbox.put(("add", submission))
        finished = False
        try:
            while True:
                item = await sink.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._inbox.put(("abort", request_id))

    def _num_waiting_for_room(self) -> int:
        """Requests that cannot start at the next step: those queued (in the inbox or the
        scheduler's waiting list) beyond the free sequence slots the last step left."""
        queued = self._num_submitted - self._num_taken + len(self.engine.scheduler.waiting)
        return max(0, queued - self._free_slots)

    def begin_shutdown(self, timeout: float) -> None:
        """Stop taking work at once; in-flight requests may finish for `timeout` seconds, then the
        rest end with a ShuttingDown error (streams get an error event), and the loop stops."""
        if not self._draining:
            self._draining = True
            self._inbox.put(("drain", timeout))

    def shutdown(self, timeout: float = 30.0) -> None:
        """begin_shutdown, then wait for the loop to stop."""
        self.begin_shutdown(timeout)
        self._thread.join(timeout + 5)

    def _run(self) -> None:
        if self.engine is None and not self._load():
            return
        self._free_slots = self._count_free_slots()
        try:
            while not self._stop.is_set():
                self._take_inbox(block=not self.engine.has_unfinished_requests())
                self._step()
        except BaseException as err:  # the loop must never die silently: fail every open request
            self.error = err
            for sub in list(self._sinks.values()):
                sub.loop.call_soon_threadsafe(sub.sink.put_nowait, RuntimeError("the engine loop failed"))
            raise

    def _load(self) -> bool:
        try:
            self.engine = self._factory()
            return True
        except BaseException as err:
            self.error = err
            if self._on_load_error is None:
                raise
            self._on_load_error(err)
            return False

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:  # noqa: BLE001  (any failure of one step; see _recover)
            self._recover(err)
            return
        for out in outputs:
            self._deliver(out)
        self._free_slots = self._count_free_slots()
        if self.metrics:
            self.metrics.on_step(self.engine)

    def _count_free_slots(self) -> int:
        engine = self.engine
        used = sum(len(r.hypotheses) for r in engine.scheduler.running if r.model == engine.default_model)
        return max(0, engine.config.max_num_seqs - used)

    def _recover(self, err: Exception) -> None:
        """Fail every request in flight with a StepFailed and go on serving, if aborting them
        leaves the engine clean; otherwise re-raise, which ends the loop (and /health says 503)."""
        traceback.print_exc()
        failure = StepFailed(f"an engine step failed ({type(err).__name__}); the request was dropped")
        for request_id, sub in list(self._sinks.items()):
            sub.loop.call_soon_threadsafe(sub.sink.put_nowait, failure)
            out = self.engine.abort_request(request_id)
            if self.metrics and out is not None:
                self.metrics.on_output(out)
        self._sinks.clear()
        if not self.engine.abort_all():
            raise err

    def _take_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, payload = self._inbox.get(block=block, timeout=0.1 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                self._add(payload)
            elif kind == "abort":
                self._abort(payload)
            elif kind == "drain":
                self._drain(payload)

    def _add(self, sub: _Submission) -> None:
        self._num_taken += 1
        try:
            request = self.engine.add_request(sub.request_id, sub.prompt, sub.params, sub.model, sub.prompt_token_ids,
                                              sub.no_context)
        except (ValueError, NotImplementedError) as err:  # the request's own fault: a 400
            sub.loop.call_soon_threadsafe(sub.sink.put_nowait, err)
            return
        except Exception as err:  # noqa: BLE001  (anything else fails this request alone, never the loop)
            traceback.print_exc()
            failure = StepFailed(f"admitting the request failed ({type(err).__name__})")
            sub.loop.call_soon_threadsafe(sub.sink.put_nowait, failure)
            return
        self._sinks[sub.request_id] = sub
        if self.metrics:
            self.metrics.on_add(request)

    def _abort(self, request_id: str) -> None:
        if self._sinks.pop(request_id, None) is not None:
            out = self.engine.abort_request(request_id)
            if self.metrics and out is not None:
                self.metrics.on_output(out)

    def _deliver(self, out: RequestOutput) -> None:
        sub = self._sinks.get(out.request_id)
        if sub is None:
            return
        if self.metrics:
            self.metrics.on_output(out)
        if out.finished:
            del self._sinks[out.request_id]
        # NOTE: outputs share lists with live hypotheses; hand the other thread a frozen copy.
        item = StepFailed(out.error) if out.error else snapshot(out)
        sub.loop.call_soon_threadsafe(sub.sink.put_nowait, item)

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.engine.has_unfinished_requests() and time.monotonic() < deadline:
            self._take_inbox(block=False)  # NOTE: disconnects still abort while draining
            self._step()
        failure = ShuttingDown(f"the server shut down before this request finished ({timeout:g} s drain)")
        for request_id, sub in list(self._sinks.items()):
            sub.loop.call_soon_threadsafe(sub.sink.put_nowait, failure)
            self._abort(request_id)
        self._stop.set()
