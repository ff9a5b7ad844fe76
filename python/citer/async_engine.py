"""AsyncEngine: an Engine for asyncio servers, driven by one background thread.

The thread owns the Engine: it adds and aborts requests (commands queued from the event
loop), runs `step()` while requests are running and sleeps on a condition when none are
(no spinning). Each step's events are handed to the event loop with
`call_soon_threadsafe`, so no model forward ever runs on the loop.

    engine = AsyncEngine()                    # Engine(...)'s arguments, or EngineArgs, or engine=
    async for delta in engine.generate("Q: 2+3? A:", SamplingParams(max_tokens=8)):
        print(delta.text, delta.from_llm, delta.finish_reason)

- `generate` yields one RequestDelta per step in which its request decided tokens (the
  new token ids, text delta, from_llm, router scores, logprobs; the final one carries
  the RequestOutput with its stats). With n > 1 samples, deltas of all of them (index).
- Cancelling the consumer (task cancel, a client that disconnects, `aclose()`) aborts
  the request before the next step and frees its blocks. `abort(id)` is a no-op on
  unknown or finished ids.
- A request that fails in a step raises RequestError in its consumer; the loop goes on
  serving the others. Bad input raises (ValueError / TypeError) from `generate` before
  anything is queued for the request.
- Same seed, same output as Engine.generate: requests are batch-invariant.
- The Engine is built on the engine thread, so that the thread that runs the models also
  owns the CPU's OpenMP thread pool: a pool built on another thread first (an Engine
  passed in with engine=, built on the main thread) leaves libgomp with more threads
  than cores, it stops spin-waiting, and small models then decode up to 2x slower on
  the CPU (measured on the demo pair, 2 cores). Pass Engine arguments, not an Engine,
  unless it runs on a GPU.
"""
import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Dict, List, Optional

from citer.engine.args import EngineArgs
from citer.engine.core import STEP_API
from citer.engine.outputs import RequestOutput, TokenEvent, TokenLogprob
from citer.engine.sampling_params import SamplingParams

from .api import Engine


class RequestError(RuntimeError):
    """A request failed inside a step (its message says what failed)."""


@dataclass
class RequestDelta:
    request_id: str
    index: int  # which of the prompt's n samples
    token_ids: List[int]  # decided in this step
    text: str  # the text they add
    from_llm: List[bool]
    router_scores: List[Optional[float]]
    logprobs: Optional[List[TokenLogprob]] = None
    finish_reason: Optional[str] = None
    output: Optional[RequestOutput] = None  # on the last delta: the whole output, with stats
    arrival: float = field(default_factory=time.perf_counter)  # when the loop received it


class AsyncEngine:
    def __init__(self, *args, engine: Optional[Engine] = None, **kwargs):
        """AsyncEngine(slm, llm, router, **options) or AsyncEngine(EngineArgs(...)): the Engine is
        built on the engine thread (arguments checked here first); or engine= an Engine."""
        if engine is None:
            engine_args = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], EngineArgs) \
                else EngineArgs(*args, **kwargs)
        self.engine = engine
        self._cv = threading.Condition()
        self._commands: List[Callable[[], None]] = []
        self._routes: Dict[str, tuple] = {}  # request id -> (loop, queue); touched by the thread only
        self._stopping = False
        self._fatal: Optional[BaseException] = None
        built = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(None if engine else engine_args, built),
                                        name="citer-engine",
                                        daemon=True)
        self._thread.start()
        built.wait()
        if self.engine is None:  # the constructor's error, raised here (bad paths, shapes, ...)
            self._thread.join()
            raise self._fatal

    # ---- the consumer side (event loop) -------------------------------------------------
    async def add_request(self, prompt, params: Optional[SamplingParams] = None,
                          request_id: Optional[str] = None) -> "RequestStream":
        """Queue a request; -> the async iterator of its deltas. Raises (ValueError /
        TypeError, naming the problem) on bad input, with nothing queued."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        added = loop.create_future()
        params = params or SamplingParams()

        def add():
            try:
                rid = self.engine.add_request(prompt, params, request_id)
            except BaseException as e:  # bad input: the caller's error
                loop.call_soon_threadsafe(_fail, added, e)
                return
            self._routes[rid] = (loop, queue)
            loop.call_soon_threadsafe(self._settle_added, added, rid)

        self._submit(add)
        return RequestStream(self, await added, queue, params.n)

    async def generate(self, prompt, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestDelta]:
        """The request's deltas as they are decided (add_request, then its stream)."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()

    def abort(self, request_id: str) -> None:
        """Abort a request before the next step (a no-op for unknown or finished ids)."""
        self._submit(lambda: self.engine.abort(request_id))

    async def check_health(self) -> None:
        """Raise unless the engine thread is alive and serving."""
        if self._fatal is not None:
            raise RuntimeError(f"the engine thread stopped: {self._fatal!r}")
        if not self._thread.is_alive():
            raise RuntimeError("the engine thread is not running")

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    def _settle_added(self, future: asyncio.Future, rid: str) -> None:
        """On the loop: the request is in; its consumer may have been cancelled meanwhile."""
        if future.cancelled():
            self.abort(rid)
            self._submit(lambda: self._routes.pop(rid, None))
        else:
            future.set_result(rid)

    def _submit(self, command: Callable[[], None]) -> None:
        with self._cv:
            self._commands.append(command)
            self._cv.notify()

    # ---- the engine thread --------------------------------------------------------------
    def _run(self, engine_args: Optional[EngineArgs], built: threading.Event) -> None:
        try:
            if self.engine is None:
                self.engine = Engine.from_args(engine_args)
        except BaseException as e:
            self._fatal = e
            return
        finally:
            built.set()
        try:
            while True:
                with self._cv:
                    while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                        self._cv.wait()
                    if self._stopping:
                        return
                    commands, self._commands = self._commands, []
                for command in commands:
                    command()
                try:
                    events = self.engine.step()
                except Exception:  # the step failed: its requests' "error" events, and what it made before
                    events = self.engine.core.take(STEP_API)
                self._dispatch(events)
        except BaseException as e:  # pragma: no cover - a bug in the loop itself
            self._fatal = e
            for loop, queue in self._routes.values():
                loop.call_soon_threadsafe(queue.put_nowait, RuntimeError(f"the engine thread stopped: {e!r}"))

    def _dispatch(self, events: List[TokenEvent]) -> None:
        """One step's events -> one delta per request, handed over with one wake-up per
        event loop (a wake-up costs more than the deltas it carries)."""
        by_loop: Dict[asyncio.AbstractEventLoop, list] = {}
        by_request: Dict[str, List[TokenEvent]] = {}
        for ev in events:
            by_request.setdefault(ev.request_id, []).append(ev)
        for rid, evs in by_request.items():
            parent = rid.rsplit("#", 1)[0] if rid not in self._routes else rid
            route = self._routes.get(parent)
            if route is None:
                continue
            last = evs[-1]
            tokens = [e for e in evs if e.token_id is not None]
            delta = RequestDelta(
                request_id=parent, index=last.output.index if last.output is not None else _index(rid),
                token_ids=[e.token_id for e in tokens], text="".join(e.text for e in evs),
                from_llm=[e.from_llm for e in tokens], router_scores=[e.router_score for e in tokens],
                logprobs=[e.logprob for e in tokens] if any(e.logprob is not None for e in tokens) else None,
                finish_reason=last.finish_reason, output=last.output)
            by_loop.setdefault(route[0], []).append((route[1], delta))
        for loop, deliveries in by_loop.items():
            loop.call_soon_threadsafe(_deliver, deliveries)

    @property
    def stats(self) -> dict:
        """Requests running / waiting and KV blocks used, read as of now (for metrics;
        plain reads of the engine thread's lists and counters)."""
        core = self.engine.core
        bm = self.engine.block_manager
        return {"running": len(core.scheduler.running), "waiting": len(core.scheduler.waiting),
                "kv_blocks_used": bm.num_blocks - bm.num_free_blocks, "kv_blocks_total": bm.num_blocks}


class RequestStream:
    """One request's deltas (all its samples'), in order; closing it early aborts it."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue, n: int):
        self.engine, self.request_id, self.queue, self.live = engine, request_id, queue, n

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestDelta:
        if not self.live:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.live = 0
            raise item
        if item.finish_reason is not None:
            self.live -= 1
        if item.finish_reason == "error":
            await self.aclose()
            raise RequestError(f"request {item.request_id!r} failed: {item.output.error}")
        if not self.live:
            self._forget()
        return item

    async def aclose(self) -> None:
        if self.live:  # left early (cancelled, disconnected, closed): abort what still runs
            self.engine.abort(self.request_id)
            self.live = 0
        self._forget()

    def _forget(self) -> None:
        rid = self.request_id
        self.engine._submit(lambda: self.engine._routes.pop(rid, None))


def _deliver(deliveries: list) -> None:
    for queue, delta in deliveries:
        queue.put_nowait(delta)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.cancelled():
        future.set_exception(error)


def _index(request_id: str) -> int:
    head, _, tail = request_id.rpartition("#")
    return int(tail) if head and tail.isdigit() else 0
