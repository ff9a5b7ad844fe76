"""The FastAPI app: /v1/completions, /v1/chat/completions (streaming as server-sent events
in OpenAI's chunk format), /v1/models, /health, /metrics.

`create_app` builds the app and its state (a ServerState at app.state.citer); the routes
are the plain functions below, each reading that state from `request.app.state`. A
completion request goes through, in order: the Guard (guard.py: Host, Origin, API key,
JSON content type), its body read under a size cap and a deadline (http.py), its fields
and the server's limits (requests.py), tokenizing in a thread pool (never on the
engine's thread), its prompts added as one unit (AsyncEngine.add_requests), and the
response. From the moment its body is in, a client that leaves has every prompt of its
request aborted before the engine's next step.
"""
import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from citer.async_engine import AsyncEngine, RequestError, RequestStream
from citer.engine.requests import prompt_token_ids

from . import protocol as P
from . import requests as R
from .args import ServerArgs
from .guard import Guard
from .http import BodyError, ClientDisconnect, read_body
from .metrics import Metrics


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    args: ServerArgs
    limits: R.Limits
    metrics: Metrics
    tokenizer: Any
    pool: ThreadPoolExecutor  # tokenizes prompts and renders chat templates


def create_app(engine: AsyncEngine, model_name: str = "citer", args: Optional[ServerArgs] = None) -> FastAPI:
    """An OpenAI-compatible app serving `engine` under the model name `model_name`, with
    args' limits, API key and Host / Origin rules (default ServerArgs(): loopback names and
    origins only, the key from $CITER_API_KEY if set). Mounts into any FastAPI app."""
    args = args or ServerArgs()
    docs = args.enable_docs
    app = FastAPI(title="citer", description="token-level routed decoding, OpenAI-compatible",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    core = engine.engine
    max_model_len = core.config.max_model_len
    app.state.citer = ServerState(
        engine=engine, model_name=model_name, args=args,
        limits=R.Limits(args.max_prompts, args.max_n, args.prompt_chars(max_model_len), max_model_len),
        metrics=Metrics(), tokenizer=core.tokenizer,
        pool=ThreadPoolExecutor(args.tokenizer_threads, thread_name_prefix="citer-tokenize"))
    app.add_middleware(Guard, args=args)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


def _state(request: Request) -> ServerState:
    return request.app.state.citer


# ---- the routes ----------------------------------------------------------------------------
async def health(request: Request):
    try:
        await _state(request).engine.check_health()
    except RuntimeError as e:
        return JSONResponse(P.error_body(str(e), kind="server_error"), status_code=503)
    return {"status": "ok"}


async def models(request: Request):
    return {"object": "list", "data": [{"id": _state(request).model_name, "object": "model", "created": P.now(),
                                        "owned_by": "citer"}]}


async def prometheus(request: Request):
    st = _state(request)
    return Response(st.metrics.render(st.engine.stats), media_type="text/plain; version=0.0.4")


async def completions(request: Request):
    return await _serve(request, chat=False)


async def chat_completions(request: Request):
    return await _serve(request, chat=True)


async def http_error(request: Request, exc: HTTPException):
    """404, 405, ... as OpenAI-style errors."""
    return JSONResponse(P.error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


async def server_error(request: Request, exc: Exception):
    return JSONResponse(P.error_body(f"internal error: {type(exc).__name__}", kind="server_error"), status_code=500)


# ---- one completion request --------------------------------------------------------------
async def _serve(request: Request, chat: bool) -> Response:
    st = _state(request)
    try:
        raw = await read_body(request, st.args.max_body_bytes, st.args.body_timeout)
    except BodyError as e:
        return JSONResponse(P.error_body(str(e), None, e.code), status_code=e.status)  # the connection then closes
    except ClientDisconnect:
        return Response(status_code=499)
    try:
        body = R.parse_body(raw)
        R.check_model(body, st.model_name)
        if chat:
            items, params = R.chat_request(body, st.limits, st.tokenizer)
        else:
            items, params = R.completion_request(body, st.limits)
    except P.BadRequest as e:
        return _bad(e)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    admit = asyncio.ensure_future(_admit(st, rid, items, params, chat, body))
    left = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({admit, left}, return_when=asyncio.FIRST_COMPLETED)
        if left.done():  # the client left while its prompts were tokenized or added: none of them runs
            admit.cancel()
            await asyncio.gather(admit, return_exceptions=True)
            if not admit.cancelled() and admit.exception() is None:
                await _close(admit.result(), st.metrics)
            return Response(status_code=499)
        try:
            streams = admit.result()
        except P.BadRequest as e:
            return _bad(e)
        if body.get("stream"):
            left.cancel()  # the streaming response watches for the client from here
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return EventStream(_sse(st, rid, streams, params.n, chat, include_usage))
        return await _complete(st, rid, streams, params.n, chat, left)
    finally:
        left.cancel()


def _bad(e: P.BadRequest) -> JSONResponse:
    return JSONResponse(P.error_body(str(e), e.param, e.code), status_code=400)


async def _admit(st: ServerState, rid: str, items: list, params, chat: bool, body: dict) -> List[RequestStream]:
    """Tokenize in the pool, then add every prompt as one unit; -> their streams."""
    stop = threading.Event()
    field = "messages" if chat else "prompt"
    try:
        ids = await asyncio.get_running_loop().run_in_executor(st.pool, _tokenize, st, items, chat, stop)
    except ValueError as e:  # the engine's own prompt checks: empty, too long, out of the vocabulary
        raise P.BadRequest(str(e), param=field) from None
    finally:
        stop.set()  # cancelled (the client left): the pool stops at the next prompt
    add = asyncio.ensure_future(st.engine.add_requests(ids, params, [f"{rid}-{i}" for i in range(len(ids))]))
    try:
        return await asyncio.shield(add)
    except (ValueError, TypeError) as e:  # the engine's request checks: policy, KV pool, ...
        raise P.BadRequest(str(e), param=R.param_named(str(e), body, field)) from None
    except asyncio.CancelledError:  # the client left while its prompts went in: abort them once in (counted)
        (streams,) = await asyncio.gather(add, return_exceptions=True)
        if isinstance(streams, list):
            await _close(streams, st.metrics)
        raise


def _tokenize(st: ServerState, items: list, chat: bool, stop: threading.Event) -> List[List[int]]:
    """In the pool: prompts -> token ids, one prompt per call (the tokenizer lets go of the
    GIL inside a call, so the engine's thread keeps stepping)."""
    engine = st.engine.engine
    if chat:
        try:
            items = [st.tokenizer.apply_chat_template(items, tokenize=False, add_generation_prompt=True)]
        except Exception as e:  # noqa: BLE001 - the template refused these messages
            raise ValueError(f"the chat template cannot render these messages: {e}") from None
    ids = []
    for i, prompt in enumerate(items):
        if stop.is_set():
            break
        ids.append(prompt_token_ids(prompt, i, st.tokenizer, engine.vocab_limit, engine.config.max_model_len,
                                    add_special_tokens=not chat))  # a rendered template holds its BOS
    return ids


async def _close(streams: List[RequestStream], metrics: Metrics) -> None:
    """Close the streams; the samples still running are aborted (and counted)."""
    for s in streams:
        metrics.on_end("abort", await s.aclose())


async def _complete(st: ServerState, rid: str, streams: list, n: int, chat: bool, left: asyncio.Future) -> Response:
    consume = asyncio.ensure_future(_collect(st, rid, streams, n, chat))
    await asyncio.wait({consume, left}, return_when=asyncio.FIRST_COMPLETED)
    if not consume.done():  # the client left: abort its requests
        consume.cancel()
        await asyncio.gather(consume, return_exceptions=True)
        return Response(status_code=499)
    try:
        return JSONResponse(consume.result())
    except RequestError as e:
        return JSONResponse(P.error_body(str(e), kind="server_error"), status_code=500)


async def _collect(st: ServerState, rid: str, streams: List[AsyncIterator], n: int, chat: bool) -> dict:
    choices, outputs = [], []
    try:
        finals = [(p, d.output) async for p, d in _merged(streams, st.metrics) if d.output is not None]
    except RequestError:
        st.metrics.on_end("error")
        raise
    finally:
        await _close(streams, st.metrics)
    for p, out in finals:
        st.metrics.on_output(out)
        outputs.append(out)
        choice = {"index": p * n + out.index, "finish_reason": P.finish_reason(out.finish_reason),
                  "citer": P.provenance(out.token_ids, out.from_llm, out.router_scores)}
        if chat:
            choice["message"] = {"role": "assistant", "content": out.text or ""}
            choice["logprobs"] = P.chat_logprobs(st.tokenizer, out.logprobs)
        else:
            choice["text"] = out.text or ""
            choice["logprobs"] = P.completion_logprobs(st.tokenizer, out.logprobs)
        choices.append(choice)
    choices.sort(key=lambda c: c["index"])
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs if o.index == 0)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": P.now(),
            "model": st.model_name, "choices": choices, "usage": P.usage(prompt_tokens, outputs)}


class EventStream(StreamingResponse):
    """Server-sent events; the generator is closed (its requests aborted) as soon as the
    response ends, also when the client left mid-stream."""
    media_type = "text/event-stream"

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


async def _sse(st: ServerState, rid: str, streams: List[AsyncIterator], n: int, chat: bool, include_usage: bool):
    kind = "chat.completion.chunk" if chat else "text_completion"
    outputs, text_offsets = [], {}  # choice index -> where its next token's text starts

    def chunk(choices, **extra) -> str:
        return "data: " + json.dumps({"id": rid, "object": kind, "created": P.now(), "model": st.model_name,
                                      "choices": choices, **extra}) + "\n\n"

    try:
        if chat:
            yield chunk([{"index": p * n + i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for p in range(len(streams)) for i in range(n)])
        async for p, delta in _merged(streams, st.metrics):
            choice = {"index": p * n + delta.index, "finish_reason": P.finish_reason(delta.finish_reason),
                      "citer": P.provenance(delta.token_ids, delta.from_llm, delta.router_scores)}
            if chat:
                choice["delta"] = {"content": delta.text}
                choice["logprobs"] = P.chat_logprobs(st.tokenizer, delta.logprobs)
            else:
                choice["text"] = delta.text
                lp = P.completion_logprobs(st.tokenizer, delta.logprobs, text_offsets.get(choice["index"], 0))
                if lp is not None and lp["tokens"]:
                    text_offsets[choice["index"]] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                choice["logprobs"] = lp
            yield chunk([choice])
            if delta.output is not None:
                st.metrics.on_output(delta.output)
                outputs.append(delta.output)
        if include_usage:
            prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs if o.index == 0)
            yield chunk([], usage=P.usage(prompt_tokens, outputs))
    except RequestError as e:
        st.metrics.on_end("error")
        yield "data: " + json.dumps(P.error_body(str(e), kind="server_error")) + "\n\n"
    finally:
        await _close(streams, st.metrics)  # a client that left: abort what is still running
    yield "data: [DONE]\n\n"


async def _merged(streams: List[AsyncIterator], metrics: Metrics):
    """(prompt index, delta) from several streams as they come."""
    queue: asyncio.Queue = asyncio.Queue()
    start = time.perf_counter()
    last = {}

    async def pump(p, stream):
        try:
            async for delta in stream:
                await queue.put((p, delta))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((p, e))
        finally:
            await queue.put((p, None))

    tasks = [asyncio.ensure_future(pump(p, s)) for p, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            p, item = await queue.get()
            if item is None:
                live -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            if item.token_ids:
                t = time.perf_counter()
                key = (p, item.index)
                (metrics.ttft if key not in last else metrics.itl).observe(t - last.get(key, start))
                last[key] = t
            yield p, item
    finally:
        for t in tasks:
            t.cancel()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
