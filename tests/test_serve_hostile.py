"""`citer serve` against hostile input and hostile clients (issue 23), as a subprocess on a
free loopback port with an API key, short read timeouts and a raised prompt-list limit:
malformed bodies get 400s naming the field, oversized ones 413s, limits 400s before any
heavy work, requests without the key 401s, cross-origin and non-JSON requests 403s and
415s, slow heads and bodies are cut off, and a client that leaves, before or after its
prompts went in, has all of them aborted. After each case a normal request gives the
same text as before, and /metrics shows 0 running and 0 KV blocks used within a second.
Every wait is bounded; the server is always stopped."""
import json
import socket
import time

import httpx2 as httpx
import openai
import pytest

from citer.research.tasks import get_task
from conftest import serve_process

KEY = "hostile-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
PROMPT = get_task("arith").test_problems(1)[0].prompt
MAX_PROMPTS = 2000  # raised from the default, to drive the 2,000-prompt client
MAX_MODEL_LEN = 256  # the demo pair's
MAX_CHARS = 16 * MAX_MODEL_LEN  # the default --max-prompt-chars


@pytest.fixture(scope="module")
def server():
    args = ["--header-timeout", "1", "--body-timeout", "1", "--timeout-keep-alive", "1", "--max-prompts",
            str(MAX_PROMPTS)]
    with serve_process(args, env={"CITER_API_KEY": KEY}) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def baseline(client):
    return normal_text(client)


def normal_text(client) -> str:
    return client.completions.create(model="citer-demo", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text


def post(server, path="/v1/completions", body=None, content=None, headers=None, timeout=30):
    h = {"content-type": "application/json", **AUTH, **(headers or {})}
    data = content if content is not None else json.dumps(body).encode()
    return httpx.post(server + path, content=data, headers=h, timeout=timeout)


def metrics(server) -> dict:
    out = {}
    for ln in httpx.get(server + "/metrics", timeout=5).text.splitlines():
        if ln and not ln.startswith("#"):
            name, value = ln.rsplit(" ", 1)
            out[name] = float(value)
    return out


def aborted(server) -> float:
    return metrics(server).get('citer_requests_finished_total{reason="abort"}', 0.0)


def settled(server, within=1.0) -> bool:
    """0 requests running or waiting and 0 KV blocks used, within `within` seconds."""
    deadline = time.time() + within
    while True:
        m = metrics(server)
        if m["citer_requests_running"] == m["citer_requests_waiting"] == m["citer_kv_blocks_used"] == 0:
            return True
        if time.time() > deadline:
            return False
        time.sleep(0.02)


def check_error(r, status, param=..., code=...):
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


@pytest.fixture
def recovers(server, client, baseline):
    """After the case: the same text as before, and nothing left running."""
    yield
    assert settled(server), metrics(server)
    assert normal_text(client) == baseline


def deep(n: int) -> str:
    return "[" * n + "]" * n


MSG = [{"role": "user", "content": "Tom has 4 beads. He finds 5 more. How many beads does he have now?"}]


# ---- 1. malformed bodies: a 400 naming the field ------------------------------------------
@pytest.mark.parametrize("path,text,param", [
    ("/v1/completions", '{"prompt": %s}' % deep(10_000), "prompt"),
    ("/v1/completions", '{"prompt": "hi", "stop": %s}' % ('{"a":' * 10_000 + "1" + "}" * 10_000), "stop"),
    ("/v1/completions", deep(10_000), None),
    ("/v1/completions", '{"prompt": "hi", "stream": true, "stream_options": "x"}', "stream_options"),
    ("/v1/completions", '{"prompt": "hi", "stream": true, "stream_options": [1]}', "stream_options"),
    ("/v1/completions", '{"prompt": "hi", "stream_options": {"include_usage": true}}', "stream_options"),
    ("/v1/completions", '{"prompt": "hi", "stream": true, "stream_options": {"include_usage": "yes"}}',
     "stream_options.include_usage"),
    ("/v1/completions", '{"prompt": "hi", "\\ud800": 1}', "\\ud800"),
    ("/v1/chat/completions", '{"messages": %s, "\\udfff": 1}' % json.dumps(MSG), "\\udfff"),
    ("/v1/completions", '{"prompt": "hi \\udc00"}', "prompt"),
    ("/v1/completions", '{"prompt": "hi", "stream": "false"}', "stream"),
    ("/v1/completions", '{"prompt": "hi", "ignore_eos": 1}', "ignore_eos"),
    ("/v1/chat/completions", '{"messages": %s, "verify": "true"}' % json.dumps(MSG), "verify"),
    ("/v1/completions", '{"prompt": "hi", "temperature": Infinity}', "temperature"),
    ("/v1/completions", '{"prompt": "hi", "temperature": -Infinity}', "temperature"),
    ("/v1/completions", '{"prompt": "hi", "top_p": NaN}', "top_p"),
    ("/v1/completions", '{"prompt": "hi", "temperature": 1e400}', "temperature"),
    ("/v1/completions", '{"prompt": "hi", "temperature": 1%s}' % ("0" * 400), "temperature"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": %s}' % ("9" * 5000), "max_tokens"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": "16"}', "max_tokens"),
    ("/v1/completions", '{"prompt": "hi", "top_k": %d}' % 2 ** 63, "top_k"),
    ("/v1/completions", '{"prompt": "hi", "n": 1.5}', "n"),
    ("/v1/completions", '{"prompt": "hi", "logprobs": true}', "logprobs"),
    ("/v1/completions", '{"prompt": "hi", "stop": [1]}', "stop"),
    ("/v1/completions", '{"prompt": {"text": "hi"}}', "prompt"),
    ("/v1/completions", '{"model": "citer-demo", "prompt": "hi", "model": "other"}', "model"),
    ("/v1/completions", '{"prompt": "hi"} trailing', None),
    ("/v1/completions", '{"prompt": "hi",}', None),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user"}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"content": "hi"}]}', "messages"),
])
def test_malformed_bodies_are_400s_naming_the_field(server, recovers, path, text, param):
    r = post(server, path, content=text.encode())
    check_error(r, 400, param)
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_invalid_utf8_and_empty_bodies(server, recovers):
    check_error(post(server, content=b'{"prompt": "\xff\xfe"}'), 400, None)
    check_error(post(server, content=b""), 400, None)


# ---- 2. limits, refused before any heavy work ----------------------------------------------
def test_body_limit_413_by_length_and_by_chunks(server, recovers):
    t = time.perf_counter()
    r = post(server, body={"prompt": "x" * 10_000_000, "max_tokens": 4})  # the 10 MB prompt
    check_error(r, 413, None, "body_too_large")
    assert time.perf_counter() - t < 5

    def chunks():
        for _ in range(40):
            yield b" " * 65536  # 2.5 MB of JSON whitespace, no Content-Length

    check_error(post(server, content=chunks()), 413, None, "body_too_large")


def test_prompt_limits(server, recovers):
    err = check_error(post(server, body={"prompt": "x" * 900_000}), 400, "prompt")  # refused before tokenizing
    assert "--max-prompt-chars" in err["message"]
    check_error(post(server, body={"prompt": "x " * (MAX_CHARS // 2 - 1)}), 400, "prompt")  # tokenized: too long
    check_error(post(server, body={"prompt": [5] * 100_000}), 400, "prompt")  # ids past max_model_len
    err = check_error(post(server, body={"prompt": ["Q: 1+1? A:"] * (MAX_PROMPTS + 1)}), 400, "prompt")
    assert "--max-prompts" in err["message"]
    check_error(post(server, body={"prompt": "hi", "n": 17}), 400, "n")
    check_error(post(server, "/v1/chat/completions", body={"messages": [{"role": "user", "content": "y" * 5000}]}),
                400, "messages")
    check_error(post(server, body={"prompt": ["Q: 1+1? A:", [10 ** 9]]}), 400, "prompt")  # one bad prompt: none runs
    assert metrics(server)["citer_requests_running"] == 0


def test_huge_request_heads(server, recovers):
    check_error(httpx.get(server + "/health", headers={"x-filler": "a" * 40_000}, timeout=10), 431, None)
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # a 1 MB URL, arriving in pieces
        s.sendall(b"GET /health?" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = closed_within(s, 5)
    assert b" 400 " in reply.split(b"\r\n", 1)[0] and "error" in json.loads(reply.split(b"\r\n\r\n", 1)[1])


# ---- 3. clients that leave: all their prompts aborted within a step -------------------------
def test_a_2000_prompt_client_that_leaves_after_1s(server, recovers):
    before = aborted(server)
    with pytest.raises(httpx.TimeoutException):
        post(server, body={"prompt": [PROMPT] * 2000, "max_tokens": 200, "ignore_eos": True, "temperature": 0},
             timeout=1.0)
    assert settled(server), metrics(server)
    assert aborted(server) - before >= 1  # the ones that were running, counted as aborted


def test_a_client_that_leaves_before_its_prompts_are_in(server, recovers):
    port = int(server.rsplit(":", 1)[1])
    body = json.dumps({"prompt": [PROMPT] * MAX_PROMPTS, "max_tokens": 200, "ignore_eos": True}).encode()
    for wait in (0.0, 0.05, 0.3):  # while the body is parsed, while it is tokenized, after it went in
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                      b"\r\n\r\n" + body)
            time.sleep(wait)
        assert settled(server), (wait, metrics(server))


def test_streams_that_leave_after_the_first_chunk(server, client, recovers):
    before = aborted(server)
    for _ in range(3):
        stream = client.completions.create(model="citer-demo", prompt=[PROMPT, PROMPT + " "], n=2, max_tokens=200,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        stream.close()
    assert settled(server), metrics(server)
    assert aborted(server) - before >= 3


# ---- 4. the API key ------------------------------------------------------------------------
def test_api_key(server, client, recovers):
    for key in ("wrong", KEY + "x"):
        bad = openai.OpenAI(base_url=server + "/v1", api_key=key, timeout=10, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.completions.create(model="citer-demo", prompt=PROMPT, max_tokens=4)
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = httpx.post(server + "/v1/completions", json={"prompt": "hi"}, timeout=10)  # no Authorization at all
    check_error(r, 401, None)
    check_error(httpx.get(server + "/v1/models", headers={"authorization": "Basic " + KEY}, timeout=10), 401)
    assert httpx.get(server + "/health", timeout=10).status_code == 200  # open without the key
    assert httpx.get(server + "/metrics", timeout=10).status_code == 200
    assert client.models.list().data[0].id == "citer-demo"


# ---- 5. cross-origin use -------------------------------------------------------------------
def test_json_content_type_required(server, recovers):
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
               "application/json; charset=latin-1"):
        check_error(post(server, content=body, headers={"content-type": ct}), 415, None, "unsupported_media_type")
    r = httpx.post(server + "/v1/completions", content=body, headers=AUTH, timeout=10)  # none at all
    check_error(r, 415)
    assert post(server, content=body, headers={"content-type": "Application/JSON; charset=UTF-8"}).status_code == 200


def test_origin_and_host_allow_lists(server, recovers):
    body = {"prompt": "hi", "max_tokens": 2}
    for origin in ("https://evil.example", "http://localhost.evil.example", "null", "http://127.0.0.1.nip.io:8000"):
        check_error(post(server, body=body, headers={"origin": origin}), 403, None, "origin_not_allowed")
    check_error(httpx.get(server + "/health", headers={"origin": "https://evil.example"}, timeout=10), 403)
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example"):  # DNS rebinding
        check_error(post(server, body=body, headers={"host": host}), 403, None, "host_not_allowed")
    for origin in ("http://localhost:5173", "http://127.0.0.1:8000", "http://[::1]:3000"):
        assert post(server, body=body, headers={"origin": origin}).status_code == 200
    assert post(server, body=body, headers={"host": "localhost:1234"}).status_code == 200


def test_docs_are_off(server, recovers):
    for path in ("/docs", "/redoc", "/openapi.json"):
        check_error(httpx.get(server + path, headers=AUTH, timeout=10), 404)


# ---- 6. slow and idle clients ----------------------------------------------------------------
def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends until it closes the connection; fails if it is still open after `seconds`."""
    sock.settimeout(seconds)
    data = b""
    while True:
        part = sock.recv(65536)
        if not part:
            return data
        data += part


def test_slow_heads_and_bodies_are_cut_off(server, client, baseline, recovers):
    port = int(server.rsplit(":", 1)[1])
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n")
    socks = []
    try:
        for i in range(60):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(head[:40] if i % 3 == 0 else head + b'{"prompt": ' if i % 3 == 1 else b"")
            socks.append(s)
        t = time.perf_counter()
        assert normal_text(client) == baseline  # served meanwhile
        replies = [closed_within(s, 6) for s in socks]
        assert time.perf_counter() - t < 6
    finally:
        for s in socks:
            s.close()
    for i, reply in enumerate(replies):
        if i % 3 == 1:  # a body that stopped half-way: 408, OpenAI-style
            status = reply.split(b"\r\n", 1)[0]
            assert b" 408 " in status, reply[:200]
            assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_timeout"
        else:  # a head that never finished, or an idle connection: closed
            assert reply == b""


# ---- the rules themselves, in-process (no server) ------------------------------------------
def guard_status(args, path="/v1/completions", method="POST", **headers):
    from citer.serve.guard import Guard

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "raw_path": path.encode(),
             "query_string": b"", "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}
    refusal = Guard(None, args).check(scope)
    return 200 if refusal is None else refusal.status_code


def test_guard_rules_by_bind_address_and_flags():
    from citer.serve import ServerArgs

    j = {"content_type": "application/json"}
    local, public = ServerArgs(api_key=None), ServerArgs(host="0.0.0.0", api_key=None)
    assert guard_status(local, host="localhost:8000", **j) == 200
    assert guard_status(local, host="my.server.example", **j) == 403  # loopback bind: loopback names only
    assert guard_status(public, host="my.server.example", **j) == 200  # public bind: any Host ...
    assert guard_status(public, host="my.server.example", origin="http://localhost:3000", **j) == 403  # no Origin
    ui = ServerArgs(host="0.0.0.0", api_key=None, allowed_origins="https://ui.example.com,http://localhost:*",
                    allowed_hosts="*.example.com")
    assert guard_status(ui, host="api.example.com", origin="https://ui.example.com", **j) == 200
    assert guard_status(ui, host="api.example.com", origin="https://ui.example.com:8443", **j) == 403
    assert guard_status(ui, host="api.example.com", origin="http://localhost:9999", **j) == 200
    assert guard_status(ui, host="example.org", **j) == 403
    keyed = ServerArgs(api_key="k")
    assert guard_status(keyed, "/health", "GET") == 200 and guard_status(keyed, "/metrics", "GET") == 200
    assert guard_status(keyed, "/v1/models", "GET") == 401
    assert guard_status(keyed, "/v1/models", "GET", authorization="Bearer k") == 200
    strict = ServerArgs(api_key="k", auth_all_routes=True)
    assert guard_status(strict, "/health", "GET") == 401 and guard_status(strict, "/metrics", "GET") == 401
    assert guard_status(local, "/v1/completions", content_type="text/plain") == 415


def test_server_args_checked_and_from_the_environment(monkeypatch):
    from citer.serve import ServerArgs

    monkeypatch.setenv("CITER_API_KEY", "from-env")
    assert ServerArgs().api_key == "from-env" and ServerArgs(api_key="flag").api_key == "flag"
    for bad in (dict(max_body_bytes=0), dict(max_n=0), dict(body_timeout=float("inf")), dict(max_prompts=True),
                dict(api_key="")):
        with pytest.raises(ValueError):
            ServerArgs(**bad)
    assert ServerArgs(max_prompt_chars=None).prompt_chars(256) == 4096
