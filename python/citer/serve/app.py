"""The FastAPI app: /v1/completions, /v1/chat/completions (streaming as server-sent events
in OpenAI's chunk format), /v1/models, /health, /metrics."""
import asyncio
import json
import time
import uuid
from typing import AsyncIterator, List

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from citer.async_engine import AsyncEngine, RequestError

from . import protocol as P
from .metrics import Metrics


def create_app(engine: AsyncEngine, model_name: str = "citer") -> FastAPI:
    """An OpenAI-compatible app serving `engine` under the model name `model_name`."""
    app = FastAPI(title="citer", description="token-level routed decoding, OpenAI-compatible")
    metrics = Metrics()
    tokenizer = engine.engine.tokenizer

    def bad(e: P.BadRequest) -> JSONResponse:
        return JSONResponse(P.error_body(str(e), e.param, e.code), status_code=400)

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise P.BadRequest(f"the request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise P.BadRequest("the request body must be a JSON object")
        if body.get("model") not in (None, model_name):
            raise P.BadRequest(f"model {body.get('model')!r} is not served here; this server serves {model_name!r}",
                               param="model", code="model_not_found")
        return body

    @app.get("/health")
    async def health():
        try:
            await engine.check_health()
        except RuntimeError as e:
            return JSONResponse(P.error_body(str(e), kind="server_error"), status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": P.now(),
                                            "owned_by": "citer"}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(engine.stats), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await body_of(request)
            prompts, params = P.completion_request(body)
        except P.BadRequest as e:
            return bad(e)
        return await respond(request, body, prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await body_of(request)
            prompt, params = P.chat_request(body, tokenizer)
        except P.BadRequest as e:
            return bad(e)
        return await respond(request, body, [prompt], params, chat=True)

    async def respond(request: Request, body: dict, prompts: list, params, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        streams = []
        try:
            for i, prompt in enumerate(prompts):
                streams.append(await engine.add_request(prompt, params, request_id=f"{rid}-{i}"))
        except (ValueError, TypeError) as e:  # the engine's checks: prompt too long, bad ids, ...
            for s in streams:
                await s.aclose()
            return bad(P.BadRequest(str(e)))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(sse(rid, streams, params.n, chat, include_usage), media_type="text/event-stream")
        consume = asyncio.ensure_future(collect(rid, streams, params.n, chat))
        watch = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait({consume, watch}, return_when=asyncio.FIRST_COMPLETED)
        if consume not in done:  # the client left: abort its requests
            consume.cancel()
            await asyncio.gather(consume, return_exceptions=True)
            return Response(status_code=499)
        watch.cancel()
        try:
            return consume.result()
        except RequestError as e:
            return JSONResponse(P.error_body(str(e), kind="server_error"), status_code=500)

    async def collect(rid: str, streams: List[AsyncIterator], n: int, chat: bool) -> dict:
        choices, outputs = [], []
        try:
            finals = [(p, d.output) async for p, d in _merged(streams, metrics) if d.output is not None]
        finally:
            for s in streams:
                await s.aclose()
        for p, out in finals:
            metrics.on_output(out)
            outputs.append(out)
            choice = {"index": p * n + out.index, "finish_reason": P.finish_reason(out.finish_reason),
                      "citer": P.provenance(out.token_ids, out.from_llm, out.router_scores)}
            if chat:
                choice["message"] = {"role": "assistant", "content": out.text or ""}
                choice["logprobs"] = P.chat_logprobs(tokenizer, out.logprobs)
            else:
                choice["text"] = out.text or ""
                choice["logprobs"] = P.completion_logprobs(tokenizer, out.logprobs)
            choices.append(choice)
        choices.sort(key=lambda c: c["index"])
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs if o.index == 0)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": P.now(),
                "model": model_name, "choices": choices, "usage": P.usage(prompt_tokens, outputs)}

    async def sse(rid: str, streams: List[AsyncIterator], n: int, chat: bool, include_usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        outputs = []

        def chunk(choices, **extra) -> str:
            return "data: " + json.dumps({"id": rid, "object": kind, "created": P.now(), "model": model_name,
                                          "choices": choices, **extra}) + "\n\n"

        try:
            if chat:
                yield chunk([{"index": p * n + i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for p in range(len(streams)) for i in range(n)])
            async for p, delta in _merged(streams, metrics):
                index = p * n + delta.index
                choice = {"index": index, "finish_reason": P.finish_reason(delta.finish_reason),
                          "citer": P.provenance(delta.token_ids, delta.from_llm, delta.router_scores)}
                if chat:
                    choice["delta"] = {"content": delta.text}
                    choice["logprobs"] = P.chat_logprobs(tokenizer, delta.logprobs)
                else:
                    choice["text"] = delta.text
                    choice["logprobs"] = P.completion_logprobs(tokenizer, delta.logprobs)
                yield chunk([choice])
                if delta.output is not None:
                    metrics.on_output(delta.output)
                    outputs.append(delta.output)
            if include_usage:
                prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs if o.index == 0)
                yield chunk([], usage=P.usage(prompt_tokens, outputs))
        except RequestError as e:
            yield "data: " + json.dumps(P.error_body(str(e), kind="server_error")) + "\n\n"
        finally:
            for s in streams:
                await s.aclose()  # a client that left: abort what is still running
        yield "data: [DONE]\n\n"

    return app


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
