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
- `add_requests` queues several prompts as one unit (one command on the engine thread:
  all in, or none). Prompts may be text or token ids (a server tokenizes off this
  thread and hands ids in).
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
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Dict, List, Optional, Sequence

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
        """Queue a request (text or token ids); -> the async iterator of its deltas. Raises
        (ValueError / TypeError, naming the problem) on bad input, with nothing queued."""
        (stream,) = await self.add_requests([prompt], params, None if request_id is None else [request_id])
        return stream

    async def add_requests(self, prompts: Sequence, params: Optional[SamplingParams] = None,
                           request_ids: Optional[Sequence[str]] = None) -> List["RequestStream"]:
        """Queue several prompts as one unit: one command on the engine thread adds them
        all, or none if one is refused (the error names the prompt's index), so no step
        runs between them. -> one stream per prompt. Cancelled while waiting (its client
        left), every prompt it added is aborted before the next step."""
        loop = asyncio.get_running_loop()
        params = params or SamplingParams()
        prompts = list(prompts)
        if request_ids is not None and len(request_ids) != len(prompts):
            raise ValueError(f"{len(request_ids)} request ids for {len(prompts)} prompts")
        queues = [asyncio.Queue() for _ in prompts]
        added = loop.create_future()

        def add():
            rids = []
            try:
                for i, prompt in enumerate(prompts):
                    try:
                        rids.append(self.engine.add_request(prompt, params,
                                                            None if request_ids is None else request_ids[i]))
                    except (ValueError, TypeError) as e:
                        e.args = (_renumbered(str(e), i),)
                        raise
            except BaseException as e:  # bad input: the caller's error; the unit goes in whole or not at all
                for rid in rids:
                    self.engine.abort(rid)
                _post(loop, _fail, added, e)
                return
            for rid, queue in zip(rids, queues):
                self._routes[rid] = (loop, queue)
            if not _post(loop, self._settle_added, added, rids):  # the consumer's loop is gone
                self._drop(rids)

        self._submit(add)
        rids = await added
        return [RequestStream(self, rid, queue, params.n) for rid, queue in zip(rids, queues)]

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
        """Abort a request before the next step; its stream ends with an "abort" delta for
        each sample still live (a no-op for unknown or finished ids)."""
        self._submit(lambda: self._abort(request_id))

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

    def _settle_added(self, future: asyncio.Future, rids: List[str]) -> None:
        """On the loop: the requests are in; their consumer may have been cancelled meanwhile."""
        if future.cancelled():
            self._submit(lambda: self._drop(rids))
        else:
            future.set_result(rids)

    def _abort(self, request_id: str) -> None:
        """On the engine thread: abort the request's live samples, and hand their consumer the
        final events (the engine sends none for the requests this thread added)."""
        samples = list(self.engine.core.requests.groups.get(request_id, [request_id]))
        self._dispatch([TokenEvent(rid, None, "", False, None, "abort", out) for rid in samples
                        if (out := self.engine.abort(rid)) is not None])

    def _drop(self, rids: List[str]) -> None:
        """On the engine thread: abort requests no consumer will read, and forget them."""
        for rid in rids:
            self.engine.abort(rid)
            self._routes.pop(rid, None)

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
                _post(loop, queue.put_nowait, RuntimeError(f"the engine thread stopped: {e!r}"))

    def _dispatch(self, events: List[TokenEvent]) -> None:
        """One step's events -> one delta per request, handed over with one wake-up per
        event loop (a wake-up costs more than the deltas it carries)."""
        by_loop: Dict[asyncio.AbstractEventLoop, list] = {}
        by_request: Dict[str, List[TokenEvent]] = {}
        for ev in events:
            by_request.setdefault(ev.request_id, []).append(ev)
        for rid, evs in by_request.items():
            alone = rid in self._routes  # an n=1 request (whatever its id looks like), or a sample of one
            parent = rid if alone else rid.rsplit("#", 1)[0]
            route = self._routes.get(parent)
            if route is None:
                continue
            last = evs[-1]
            tokens = [e for e in evs if e.token_id is not None]
            delta = RequestDelta(
                request_id=parent, index=0 if alone else last.output.index if last.output is not None else _index(rid),
                token_ids=[e.token_id for e in tokens], text="".join(e.text for e in evs),
                from_llm=[e.from_llm for e in tokens], router_scores=[e.router_score for e in tokens],
                logprobs=[e.logprob for e in tokens] if any(e.logprob is not None for e in tokens) else None,
                finish_reason=last.finish_reason, output=last.output)
            by_loop.setdefault(route[0], []).append((route[1], delta))
        for loop, deliveries in by_loop.items():
            if not _post(loop, _deliver, deliveries):  # the consumer's loop is gone: nobody reads these
                self._drop([rid for rid, (owner, _) in self._routes.items() if owner is loop])

    @property
    def stats(self) -> dict:
        """Requests running / waiting and KV blocks used, read as of now (for metrics;
        plain reads of the engine thread's lists and counters)."""
        core = self.engine.core
        bm = core.bm
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

    async def aclose(self) -> int:
        """Stop; -> how many of its samples were still live (and are now aborted)."""
        live = self.live
        if live:  # left early (cancelled, disconnected, closed): abort what still runs
            self.engine.abort(self.request_id)
            self.live = 0
        self._forget()
        return live

    def _forget(self) -> None:
        rid = self.request_id
        self.engine._submit(lambda: self.engine._routes.pop(rid, None))


def _post(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """Hand fn(*args) to the consumer's loop; False when that loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _deliver(deliveries: list) -> None:
    for queue, delta in deliveries:
        queue.put_nowait(delta)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.cancelled():
        future.set_exception(error)


def _renumbered(message: str, index: int) -> str:
    """The engine's message about "prompt 0" (each prompt goes in alone) for prompt `index`."""
    if message.startswith("prompt 0 "):
        return f"prompt {index} " + message[len("prompt 0 "):]
    return message if index == 0 else f"prompt {index}: {message}"


def _index(request_id: str) -> int:
    head, _, tail = request_id.rpartition("#")
    return int(tail) if head and tail.isdigit() else 0
