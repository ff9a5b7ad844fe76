"""`citer serve` as a subprocess on a free localhost port, talked to with the official
openai client: completions and chat, streaming and not, greedy output equal to
Engine.generate's, stop strings, n with seeds, logprobs, citer's extension fields, 400s
for bad input; and a load test: 32 concurrent streaming requests with random policies
and lengths, a third cancelled mid-stream. Bounded waits; the server is always stopped."""
import asyncio
import json
import random
import time

import httpx2 as httpx
import openai
import pytest

from citer import Engine, SamplingParams
from citer.research.tasks import get_task
from conftest import serve_process

PROBLEMS = get_task("arith").test_problems(40)


@pytest.fixture(scope="module")
def server():
    with serve_process() as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def ref():
    return Engine()  # the same embedded default, in this process


def test_completions_equal_engine_generate(client, ref):
    p = PROBLEMS[0].prompt
    r = client.completions.create(model="citer-demo", prompt=p, max_tokens=48, temperature=0)
    want = ref.generate([p], SamplingParams(max_tokens=48))[0]
    choice = r.choices[0]
    assert choice.text == want.text and choice.finish_reason == "stop"
    ext = choice.model_extra["citer"]
    assert ext["token_ids"] == want.token_ids and ext["from_llm"] == want.from_llm
    assert ext["router_scores"] == pytest.approx(want.router_scores)
    assert r.usage.completion_tokens == len(want.token_ids) and r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.model_extra["llm_tokens"] == sum(want.from_llm)
    parts, ids = [], []
    for chunk in client.completions.create(model="citer-demo", prompt=p, max_tokens=48, temperature=0, stream=True):
        parts.append(chunk.choices[0].text)
        ids += chunk.choices[0].model_extra["citer"]["token_ids"]
    assert "".join(parts) == want.text and ids == want.token_ids


def test_chat_uses_the_template_and_streams(client, ref):
    question = PROBLEMS[1].prompt.removeprefix("Q: ").removesuffix(" A:")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": question}]
    want = ref.generate([ref.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)],
                        SamplingParams(max_tokens=48, policy="speculative"))[0]
    r = client.chat.completions.create(model="citer-demo", messages=msgs, max_tokens=48, temperature=0,
                                       extra_body={"policy": "speculative"})
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="citer-demo", messages=msgs, max_tokens=48, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"policy": "speculative"})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_chat_prompts_get_one_bos():
    """A chat template that prints bos_token (Llama 3's) and a tokenizer that adds BOS: the chat
    prompt's ids are apply_chat_template's, one BOS (they once got two); a completion prompt
    still gets the tokenizer's BOS."""
    import threading
    from types import SimpleNamespace

    from tokenizers import processors

    from citer.serve.app import _tokenize
    from conftest import make_tokenizer

    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>"))])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    bos = tok.bos_token_id
    assert tok("hi").input_ids[0] == bos and bos is not None
    msgs = [{"role": "user", "content": "hi"}]
    want = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    st = SimpleNamespace(tokenizer=tok, engine=SimpleNamespace(engine=SimpleNamespace(
        vocab_limit=len(tok), config=SimpleNamespace(max_model_len=256))))
    (chat,) = _tokenize(st, msgs, True, threading.Event())
    assert chat == want and chat[:2] != [bos, bos]
    assert _tokenize(st, ["hi"], False, threading.Event()) == [tok("hi").input_ids]


def test_chat_logprob_bytes_are_the_tokens_own():
    """A byte-level BPE token that holds part of a character (one of 好's three bytes) decodes
    alone to U+FFFD; its `bytes` are its own byte, so a client can join them back."""
    from citer.engine.outputs import TokenLogprob
    from citer.research.tasks.bpe_tokenizer import train_tokenizer
    from citer.serve.protocol import chat_logprobs

    tok = train_tokenizer(["def add(a, b):\n    return a + b\n", "Tom has 3 apples."] * 10, vocab_size=300)
    ids = tok("好 ok").input_ids
    assert len(ids) > 3 and tok.decode(ids[:1]) == "\ufffd"  # the character is cut into bytes
    content = chat_logprobs(tok, [TokenLogprob(i, -1.0, [(i, -1.0)]) for i in ids])["content"]
    assert bytes(b for c in content for b in c["bytes"]).decode() == "好 ok"
    assert content[0]["top_logprobs"][0]["bytes"] == content[0]["bytes"]


def test_stop_strings_n_seeds_logprobs(client, ref):
    p = PROBLEMS[2].prompt
    r = client.completions.create(model="citer-demo", prompt=p, max_tokens=48, temperature=0, stop=["="])
    assert r.choices[0].text == ref.generate([p], SamplingParams(max_tokens=48, stop=["="]))[0].text
    assert "=" not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="citer-demo", prompt=p, max_tokens=12, n=3, seed=7, temperature=0.8,
                                  logprobs=2, extra_body={"policy": "random", "llm_fraction": 0.3})
    again = client.completions.create(model="citer-demo", prompt=p, max_tokens=12, n=3, seed=7, temperature=0.8,
                                      logprobs=2, extra_body={"policy": "random", "llm_fraction": 0.3})
    assert [c.text for c in r.choices] == [c.text for c in again.choices] and [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        want = ref.generate([p], SamplingParams(max_tokens=12, seed=7 + c.index, temperature=0.8, logprobs=2,
                                                policy="random", llm_fraction=0.3))[0]
        assert c.text == want.text
        assert c.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-5)
        assert all(len(top) == 2 for top in c.logprobs.top_logprobs)
        assert c.logprobs.text_offset == [len("".join(c.logprobs.tokens[:i])) for i in range(len(c.logprobs.tokens))]
    offsets = {}  # streamed: each choice's offsets run on across chunks (they once restarted at 0 in each)
    for chunk in client.completions.create(model="citer-demo", prompt=p, max_tokens=12, n=3, seed=7, temperature=0.8,
                                           logprobs=2, stream=True,
                                           extra_body={"policy": "random", "llm_fraction": 0.3}):
        for c in chunk.choices:
            offsets.setdefault(c.index, []).extend(c.logprobs.text_offset if c.logprobs else [])
    assert offsets == {c.index: c.logprobs.text_offset for c in r.choices}


@pytest.mark.parametrize("kwargs,match", [
    (dict(model="other", prompt="x"), "is not served here"),
    (dict(model="citer-demo", prompt="x", temperature=-1), "temperature"),
    (dict(model="citer-demo", prompt="x", extra_body={"policy": "oracle"}), "policy"),
    (dict(model="citer-demo", prompt="x " * 300), "max_model_len"),
    (dict(model="citer-demo", prompt="x", presence_penalty=0.5), "presence_penalty"),
    (dict(model="citer-demo", prompt="x", extra_body={"prompt_logprobs": 1}), "prompt_logprobs"),
    (dict(model="citer-demo", prompt="x", extra_body={"beam_width": 2}), "unsupported field 'beam_width'"),
])
def test_bad_requests_get_400s(client, kwargs, match):
    with pytest.raises(openai.BadRequestError, match=match) as info:
        client.completions.create(max_tokens=4, **kwargs)
    assert info.value.status_code == 400 and info.value.body["type"] == "invalid_request_error"


def test_chat_content_as_text_parts(client):
    """Message content as a list of text parts (what OpenAI's clients may send) is the parts'
    text joined; other parts, and top_logprobs without logprobs or out of range, get 400s that
    name their field."""
    ask = lambda content, **kw: client.chat.completions.create(  # noqa: E731
        model="citer-demo", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0, **kw)
    as_parts = ask([{"type": "text", "text": "2 + 3?"}, {"type": "text", "text": "Be brief."}])
    assert as_parts.choices[0].message.content == ask("2 + 3?\nBe brief.").choices[0].message.content
    assert ask("hi", top_logprobs=0).choices[0].logprobs is None  # 0 asks for nothing: no logprobs needed (vLLM)
    for content, kw, param in (([{"type": "image_url", "image_url": {"url": "x"}}], {}, "messages[0].content"),
                               (7, {}, "messages[0].content"), ("hi", dict(top_logprobs=2), "top_logprobs"),
                               ("hi", dict(logprobs=True, top_logprobs=10 ** 6), "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as info:
            ask(content, **kw)
        assert info.value.body["param"] == param and param.split(".")[-1] in info.value.body["message"]


def test_bad_bodies_and_the_server_still_answers(server, client):
    msgs = [{"role": "user", "content": "2 + 3?"}]  # a null max_completion_tokens is as if absent
    r = httpx.post(server + "/v1/chat/completions", json={"model": "citer-demo", "messages": msgs, "max_tokens": 2,
                                                          "max_completion_tokens": None, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/chat/completions", json={"model": "citer-demo", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    assert client.models.list().data[0].id == "citer-demo"


def test_load_32_concurrent_streams_a_third_cancelled(server, ref):
    rng = random.Random(0)
    policies = [dict(policy="router"), dict(policy="slm"), dict(policy="llm"), dict(policy="speculative"),
                dict(policy="confidence", confidence_threshold=0.9), dict(policy="router", verify=True)]
    jobs = [(PROBLEMS[i].prompt, rng.choice(policies), rng.randint(4, 48), i % 3 == 0) for i in range(32)]
    aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", timeout=120, max_retries=0)

    async def one(prompt, pol, max_tokens, cancel):
        stream = await aclient.completions.create(model="citer-demo", prompt=prompt, max_tokens=max_tokens,
                                                  temperature=0, stream=True, extra_body=pol)
        ids = []
        async for chunk in stream:
            ids += chunk.choices[0].model_extra["citer"]["token_ids"]
            if cancel and len(ids) >= 2:
                await stream.close()  # the client goes away mid-stream
                return None
        return ids

    async def main():
        return await asyncio.wait_for(asyncio.gather(*[one(*j) for j in jobs]), 240)

    results = asyncio.run(main())
    for (prompt, pol, max_tokens, cancel), ids in zip(jobs, results):
        if not cancel:
            assert ids == ref.generate([prompt], SamplingParams(max_tokens=max_tokens, **pol))[0].token_ids
    deadline = time.time() + 30  # aborts land within a step of the disconnect
    while True:
        text = httpx.get(server + "/metrics").text
        used = next(float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("citer_kv_blocks_used"))
        running = next(float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("citer_requests_running"))
        if used == 0 and running == 0 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert used == 0 and running == 0
    assert "citer_time_to_first_token_seconds_count" in text and "citer_llm_share" in text
    assert httpx.get(server + "/health").status_code == 200
    r = httpx.post(server + "/v1/completions", json={"model": "citer-demo", "prompt": PROBLEMS[0].prompt,
                                                     "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and json.loads(r.text)["choices"][0]["finish_reason"] == "length"
