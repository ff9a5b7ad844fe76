"""Serving under load: throughput and latency percentiles (time to first token, inter-token
latency) at concurrency 1, 8 and 32 against `citer serve` with the demo pair, and what
each layer costs on the same requests at concurrency 1: the sync Engine, AsyncEngine
(the background-thread loop), and the HTTP path (openai client -> server -> AsyncEngine).

  .venv/bin/python benchmarks/serve_load.py [--requests 32] [--max-tokens 64] [--json out.json]

Greedy, policy "router" (the demo's default), held-out arithmetic problems as prompts.
The server runs as a subprocess on this machine, so at concurrency 32 the client and
the server share its cores.
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


def http_one(client, max_tokens):
    async def one(prompt):
        t0 = time.perf_counter()
        last, first, gaps, n = None, None, [], 0
        stream = await client.completions.create(model="citer-demo", prompt=prompt, max_tokens=max_tokens,
                                                 temperature=0, stream=True)
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


def start_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "citer.cli", "serve", "--port", str(port), "--max-num-seqs", "32"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="the concurrency-1 overhead runs (median)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--layer", choices=("sync", "async"), help=argparse.SUPPRESS)  # internal: one child round
    args = ap.parse_args()
    from citer.research.tasks import get_task

    prompts = [p.prompt for p in get_task("arith").test_problems(max(args.requests, 8))][:args.requests]
    if args.layer:  # a child process: one layer, one measured round after a warm-up round
        print(json.dumps(layer_round(args.layer, prompts, args.max_tokens)))
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
