"""Serving under load: throughput and latency percentiles (time to first token, inter-token
latency) at concurrency 1, 8 and 32 against `citer serve` with the demo pair, and what
each layer costs on the same requests at concurrency 1: the sync Engine, AsyncEngine
(the background-thread loop), and the HTTP path (openai client -> server -> AsyncEngine).

  .venv/bin/python benchmarks/serve_load.py [--requests 32] [--max-tokens 64] [--json out.json]

Greedy, policy "router" (the demo's default), held-out arithmetic problems as prompts.
The server runs as a subprocess on this machine, so at concurrency 32 the client and
the server share its cores.

  .venv/bin/python benchmarks/serve_load.py --routed [--requests 32] [--json out.json]

The routed policies (issue 20): the LLM alone and the router at its default τ over HTTP at
concurrency 1, 8 and 32, on a server as before and on servers with deferred LLM calls
(--max-llm-wait / --llm-batch-min).

  .venv/bin/python benchmarks/serve_load.py --stall [--stall-requests 80] [--json out.json]

The stall case instead (issue 23): one client's 4-token completions (max_tokens 4,
ignore_eos, one at a time), in blocks that alternate between no hostile client and one
(its own process) that sends a 10 MB prompt each second, or 10 MB prompts back to back (a
flood: on a 2-core machine the hostile client's own copying competes for the cores), or
a 2,000-prompt list (max_tokens 200) each second, leaving after 1 s; against the server's
default limits (the 10 MB body is a 413, the list a 400), and with --max-prompts 2000,
where the list goes in and the hostile client really leaves after 1 s. Alternating
blocks let the machine's other load drift alike in both. Target: under default limits,
the 4-token completions within 2x their unloaded latency.
"""
import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from tqdm import tqdm


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] * 1e3 if xs else float("nan")


def summary(name, conc, wall, reqs):
    """reqs: [(ttft s, [inter-token gaps s], tokens, latency s)]"""
    toks = sum(r[2] for r in reqs)
    ttft = [r[0] for r in reqs]
    itl = [g for r in reqs for g in r[1]]
    lat = [r[3] for r in reqs]
    return dict(path=name, concurrency=conc, requests=len(reqs), tokens=toks, tok_per_s=toks / wall,
                ttft_p50=pct(ttft, 50), ttft_p90=pct(ttft, 90), ttft_p99=pct(ttft, 99),
                itl_p50=pct(itl, 50), itl_p90=pct(itl, 90), itl_p99=pct(itl, 99), latency_p50=pct(lat, 50),
                ms_per_token=sum(lat) / max(toks, 1) * 1e3)


async def drive(one, prompts, conc):
    sem = asyncio.Semaphore(conc)

    async def guarded(p):
        async with sem:
            return await one(p)

    t0 = time.perf_counter()
    reqs = await asyncio.gather(*[guarded(p) for p in prompts])
    return time.perf_counter() - t0, reqs


def http_one(client, max_tokens, policy=None):
    async def one(prompt):
        t0 = time.perf_counter()
        last, first, gaps, n = None, None, [], 0
        stream = await client.completions.create(model="citer-demo", prompt=prompt, max_tokens=max_tokens,
                                                 temperature=0, stream=True,
                                                 extra_body={"policy": policy} if policy else None)
        async for chunk in stream:
            k = len(chunk.choices[0].model_extra["citer"]["token_ids"])
            if not k:
                continue
            t = time.perf_counter()
            first = first if first is not None else t - t0
            if last is not None:
                gaps.append(t - last)
            last, n = t, n + k
        return first, gaps, n, time.perf_counter() - t0
    return one


def async_one(engine, params):
    async def one(prompt):
        t0 = time.perf_counter()
        last, first, gaps, n = None, None, [], 0
        async for delta in engine.generate(prompt, params):
            if not delta.token_ids:
                continue
            t = time.perf_counter()
            first = first if first is not None else t - t0
            if last is not None:
                gaps.append(t - last)
            last, n = t, n + len(delta.token_ids)
        return first, gaps, n, time.perf_counter() - t0
    return one


def start_server(*extra, threads=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "citer.cli", "serve", "--port", str(port), "--max-num-seqs", "32",
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env={**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})})
    import httpx2 as httpx

    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("citer serve did not start")


async def http_phase(url, prompts, args):
    """Everything over HTTP on one event loop (the client's connection pool is bound to it)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", timeout=300, max_retries=0)
    http_runs, rows = [], []
    for r in tqdm(range(args.repeats + 1), desc="HTTP, concurrency 1"):
        wall, reqs = await drive(http_one(client, args.max_tokens), prompts, 1)
        if r:  # round 0 warms up
            http_runs.append(wall / sum(x[2] for x in reqs) * 1e3)
    for conc in tqdm((1, 8, 32), desc="HTTP load"):
        load = (prompts * (2 * conc // len(prompts) + 1))[:max(len(prompts), 2 * conc)]  # >= 2 waves
        wall, reqs = await drive(http_one(client, args.max_tokens), load, conc)
        rows.append(summary("HTTP", conc, wall, reqs))
    await client.close()
    return http_runs, rows


ROUTED_SERVERS = {"as before": (), "deferred w4/b16": ("--max-llm-wait", "4", "--llm-batch-min", "16"),
                  "deferred w8/b32": ("--max-llm-wait", "8", "--llm-batch-min", "32")}


async def routed_phase(url, prompts, args, policies):
    """HTTP load at concurrency 1, 8, 32 for each policy (LLM alone, the router)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", timeout=300, max_retries=0)
    rows = []
    await drive(http_one(client, args.max_tokens, "llm"), prompts[:4], 4)  # warm-up
    for conc in (1, 8, 32):
        load = (prompts * (2 * conc // len(prompts) + 1))[:max(len(prompts), 2 * conc)]
        for policy in policies:
            wall, reqs = await drive(http_one(client, args.max_tokens, policy), load, conc)
            rows.append(summary(policy, conc, wall, reqs))
    await client.close()
    return rows


def routed_servers(prompts, args):
    """The routed policies over HTTP, servers as before and with deferred LLM calls (issue 20)."""
    out = {}
    for name, extra in tqdm(ROUTED_SERVERS.items(), desc="servers"):
        proc, url = start_server(*extra)
        try:
            out[name] = asyncio.run(routed_phase(url, prompts, args, ["llm", "router"] if not extra else ["router"]))
        finally:
            proc.terminate()
            proc.wait(15)
    llm = {r["concurrency"]: r for r in out["as before"] if r["path"] == "llm"}
    print(f"\ndemo pair over HTTP, greedy, max_tokens {args.max_tokens}: tokens/s as a ratio to the LLM alone "
          "(TTFT p50 / ITL p50 in ms)")
    print(f"{'server':<18} {'policy':<7} " + " ".join(f"{'conc ' + str(c):>26}" for c in (1, 8, 32)))
    for name, rows in out.items():
        for policy in dict.fromkeys(r["path"] for r in rows):
            cells = []
            for c in (1, 8, 32):
                r = next(r for r in rows if r["path"] == policy and r["concurrency"] == c)
                cells.append(f"{r['tok_per_s'] / llm[c]['tok_per_s']:.2f}x ({r['ttft_p50']:.0f}/{r['itl_p50']:.1f})")
            print(f"{name:<18} {policy:<7} " + " ".join(f"{x:>26}" for x in cells))
    return out


def layer_round(layer, prompts, max_tokens):
    """{ms: wall-clock per generated token, step_ms: of it inside EngineCore.step} over the
    prompts one at a time, through Engine.generate or AsyncEngine.generate (after a warm-up
    round). step_ms tells a slower step (the event loop's thread contending for the GIL
    and the cores) from time between steps (hand-offs)."""
    from citer import Engine, SamplingParams
    from citer.async_engine import AsyncEngine

    params = SamplingParams(max_tokens=max_tokens)
    engine = Engine(max_num_seqs=32) if layer == "sync" else AsyncEngine(max_num_seqs=32)
    core = (engine if layer == "sync" else engine.engine).core
    step, in_step = core.step, [0.0]

    def timed_step():
        t = time.perf_counter()
        step()
        in_step[0] += time.perf_counter() - t

    core.step = timed_step
    for measured in (False, True):
        in_step[0], t0 = 0.0, time.perf_counter()
        if layer == "sync":
            toks = sum(len(engine.generate([p], params)[0].token_ids) for p in prompts)
        else:
            toks = sum(r[2] for r in asyncio.run(drive(async_one(engine, params), prompts, 1))[1])
        wall = time.perf_counter() - t0
    if layer == "async":
        engine.shutdown()
    return dict(ms=wall / toks * 1e3, step_ms=in_step[0] / toks * 1e3)


# ---- the stall case (issue 23) --------------------------------------------------------------
STALL_PROMPT = "Q: Tom has 4 beads. He finds 5 more. How many beads does he have now? A:"
HOSTILE = {"10mb": "10 MB prompt, one a second", "10mb-flood": "10 MB prompts back to back",
           "list2000": "2,000-prompt list, leaves after 1 s"}


def hostile(url, kind, active, stop, statuses):
    """A separate process: while `active`, send `kind` ("10mb", "10mb-flood" or "list2000"): one
    request a second, or back to back for the flood; a list's request gives up after 1 s."""
    import httpx2 as httpx

    if kind.startswith("10mb"):
        body = json.dumps({"prompt": "x" * 10_000_000, "max_tokens": 4}).encode()
    else:
        body = json.dumps({"prompt": [STALL_PROMPT] * 2000, "max_tokens": 200, "ignore_eos": True}).encode()
    with httpx.Client(timeout=1.0 if kind == "list2000" else 30) as c:
        while not stop.is_set():
            if not active.is_set():
                time.sleep(0.01)
                continue
            t = time.perf_counter()
            try:
                r = c.post(url + "/completions", content=body, headers={"content-type": "application/json"})
                statuses.append(r.status_code)
            except httpx.TimeoutException:
                statuses.append("left after 1 s")
            if kind != "10mb-flood":
                time.sleep(max(0.0, 1.0 - (time.perf_counter() - t)))


async def victim_latencies(url, n):
    """n 4-token completions, one at a time; -> their latencies (s)."""
    import httpx2 as httpx

    out = []
    async with httpx.AsyncClient(timeout=60) as c:
        body = {"prompt": STALL_PROMPT, "max_tokens": 4, "ignore_eos": True, "temperature": 0}
        await c.post(url + "/completions", json=body)  # warm the connection
        for _ in range(n):
            t = time.perf_counter()
            r = await c.post(url + "/completions", json=body)
            out.append(time.perf_counter() - t)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stall_row(url, pid, kind, n, blocks):
    """Blocks of n / blocks completions, alternately without and with the hostile client (the
    machine's other load drifts; alternating compares like with like), and the server's CPU
    time (pid's) per second of each kind of block: what the hostile requests cost it,
    whatever else runs on the machine."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    active, stop, statuses = ctx.Event(), ctx.Event(), ctx.Manager().list()
    proc = ctx.Process(target=hostile, args=(url, kind, active, stop, statuses))
    proc.start()
    time.sleep(2.0)  # its imports
    off, on, cpu = [], [], {"off": [0.0, 0.0], "on": [0.0, 0.0]}  # [cpu s, wall s]

    def block(lat, which, wait):
        t, c = time.perf_counter(), cpu_seconds(pid)
        time.sleep(wait)
        lat += asyncio.run(victim_latencies(url, n // blocks))
        cpu[which][0] += cpu_seconds(pid) - c
        cpu[which][1] += time.perf_counter() - t

    try:
        for _ in range(blocks):
            active.clear()
            block(off, "off", 1.2)  # after its request in flight is answered, or it left
            active.set()
            block(on, "on", 1.2)
    finally:
        stop.set()
        proc.join(30)
    base = statistics.median(off)
    cpu_off, cpu_on = (1e3 * cpu[k][0] / cpu[k][1] for k in ("off", "on"))
    per_request = 1e3 * (cpu["on"][0] - cpu["off"][0]) / max(len(statuses), 1)
    return dict(hostile=HOSTILE[kind], requests=len(on), unloaded_p50_ms=base * 1e3, unloaded_p90_ms=pct(off, 90),
                p50_ms=statistics.median(on) * 1e3, p90_ms=pct(on, 90), max_ms=max(on) * 1e3,
                p50_vs_unloaded=statistics.median(on) / base, p90_vs_unloaded=pct(on, 90) / pct(off, 90),
                hostile_requests=len(statuses), hostile_got=sorted({str(x) for x in statuses}),
                server_cpu_ms_per_s_unloaded=cpu_off, server_cpu_ms_per_s_loaded=cpu_on,
                server_cpu_ms_per_hostile_request=per_request)


def stall_phase(args):
    rows = []
    for limits, extra, kinds in (("default limits", (), ("10mb", "10mb-flood", "list2000")),
                                 ("--max-prompts 2000", ("--max-prompts", "2000"), ("list2000",))):
        proc, url = start_server(*extra, threads=1)  # its cores are shared with two client processes
        try:
            for kind in tqdm(kinds, desc=f"stall case, {limits}"):
                rows.append(dict(server=limits, **stall_row(url, proc.pid, kind, args.stall_requests,
                                                            args.stall_blocks)))
        finally:
            proc.terminate()
            proc.wait(15)
    print(f"\n4-token completions (max_tokens 4, ignore_eos, one at a time), {args.stall_requests} with the hostile "
          f"client and as many without, in {args.stall_blocks} alternating blocks; demo pair, client and server on "
          "this machine")
    print(f"{'server':<20} {'hostile client':<36} {'unloaded p50':>12} {'p90':>6} {'loaded p50':>10} {'p90':>6} "
          f"{'max':>6} {'p50 x':>6} {'p90 x':>6} {'server cpu':>10} {'loaded':>7} {'/hostile':>8}  "
          "hostile requests: answers")
    for r in rows:
        print(f"{r['server']:<20} {r['hostile']:<36} {r['unloaded_p50_ms']:>12.1f} {r['unloaded_p90_ms']:>6.1f} "
              f"{r['p50_ms']:>10.1f} {r['p90_ms']:>6.1f} {r['max_ms']:>6.1f} {r['p50_vs_unloaded']:>6.2f} "
              f"{r['p90_vs_unloaded']:>6.2f} {r['server_cpu_ms_per_s_unloaded']:>10.0f} "
              f"{r['server_cpu_ms_per_s_loaded']:>7.0f} {r['server_cpu_ms_per_hostile_request']:>8.1f}  "
              f"{r['hostile_requests']}: {', '.join(r['hostile_got'])}")
    print("(ms; x: loaded / unloaded; server cpu: the server's CPU ms per second of unloaded / loaded blocks, and "
          "per hostile request)")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="the concurrency-1 overhead runs (median)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--stall", action="store_true", help="run the stall case (issue 23) instead")
    ap.add_argument("--stall-requests", type=int, default=80, help="4-token completions per stall row, loaded "
                    "(as many unloaded)")
    ap.add_argument("--stall-blocks", type=int, default=4, help="alternating unloaded / loaded blocks per row")
    ap.add_argument("--routed", action="store_true", help="the routed policies with and without deferred LLM "
                                                          "calls against the LLM alone, over HTTP (issue 20)")
    ap.add_argument("--layer", choices=("sync", "async"), help=argparse.SUPPRESS)  # internal: one child round
    args = ap.parse_args()
    from citer.research.tasks import get_task

    prompts = [p.prompt for p in get_task("arith").test_problems(max(args.requests, 8))][:args.requests]
    if args.layer:  # a child process: one layer, one measured round after a warm-up round
        print(json.dumps(layer_round(args.layer, prompts, args.max_tokens)))
        return
    if args.routed:
        rows = routed_servers(prompts, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(routed=rows), f, indent=1)
        return
    if args.stall:
        rows = stall_phase(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(stall=rows), f, indent=1)
        return
    # layer overhead at concurrency 1: each round in a fresh process per layer, interleaved
    # (two engines in one process share libgomp's thread count and slow each other down)
    runs = {"sync": [], "async": []}
    for _ in tqdm(range(args.repeats), desc="sync vs async, concurrency 1"):
        for layer in runs:
            out = subprocess.run([sys.executable, __file__, "--layer", layer, "--requests", str(args.requests),
                                  "--max-tokens", str(args.max_tokens)], check=True, capture_output=True, text=True)
            runs[layer].append(json.loads(out.stdout.splitlines()[-1]))
    proc, url = start_server()
    try:
        http_runs, rows = asyncio.run(http_phase(url, prompts, args))
    finally:
        proc.terminate()
        proc.wait(15)
    sync_ms, async_ms = (statistics.median(r["ms"] for r in runs[k]) for k in ("sync", "async"))
    sync_step, async_step = (statistics.median(r["step_ms"] for r in runs[k]) for k in ("sync", "async"))
    http_ms = statistics.median(http_runs)
    print(f"\ndemo pair, greedy, policy router, max_tokens {args.max_tokens}, {len(prompts)} held-out prompts")
    print("concurrency 1, the same requests, wall-clock per generated token "
          f"(median of {args.repeats} rounds):")
    print(f"  sync Engine.generate   {sync_ms:7.3f} ms  (in EngineCore.step {sync_step:.3f} ms)")
    print(f"  AsyncEngine            {async_ms:7.3f} ms  ({100 * (async_ms / sync_ms - 1):+.1f}% vs sync; "
          f"in EngineCore.step {async_step:.3f} ms)")
    print(f"  HTTP (openai client)   {http_ms:7.3f} ms  ({100 * (http_ms / sync_ms - 1):+.1f}% vs sync)")
    print(f"\n{'path':<6} {'conc':>4} {'reqs':>5} {'tok/s':>8} {'TTFT p50':>9} {'p90':>7} {'p99':>7} "
          f"{'ITL p50':>8} {'p90':>7} {'p99':>7} {'latency p50':>12} {'ms/tok':>7}  (ms)")
    for r in rows:
        print(f"{r['path']:<6} {r['concurrency']:>4} {r['requests']:>5} {r['tok_per_s']:>8.1f} {r['ttft_p50']:>9.2f} "
              f"{r['ttft_p90']:>7.2f} {r['ttft_p99']:>7.2f} {r['itl_p50']:>8.2f} {r['itl_p90']:>7.2f} "
              f"{r['itl_p99']:>7.2f} {r['latency_p50']:>12.1f} {r['ms_per_token']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(max_tokens=args.max_tokens, prompts=len(prompts), sync_ms_per_token=sync_ms,
                           async_ms_per_token=async_ms, sync_step_ms=sync_step, async_step_ms=async_step, http_ms_per_token=http_ms, load=rows), f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
