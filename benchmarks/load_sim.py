"""Routing under load on GPUs, simulated: recorded routing decisions played through the engine's
own core with the GPU cost model standing in for the forwards (citer.research.load_sim,
citer.research.cost_model).

Traces: the embedded arith pair's CITER router at its default τ and its speculative
decoding (k = 4), recorded from real runs on held-out problems (and, with --real-traces,
a JSON file of traces recorded from another pair, e.g. Qwen2.5-Coder on HumanEval).
Table: SLM/LLM shapes (0.5B/7B, 1.5B/7B, 7B/72B with the 72B over TP 4) x concurrency
(closed loop 1, 8, 32, 64; Poisson arrivals) x policy (LLM alone, routed as before,
routed with deferred LLM calls, speculative), throughput and per-token latency as ratios
to LLM alone; prompt lengths 32-4096 at concurrency 32.

    .venv/bin/python benchmarks/load_sim.py [--device H100] [--json out.json] [--real-traces t.json]
"""
import argparse
import json
import os
import sys

from tqdm import tqdm

SHAPES = [("0.5b", "7b", 1), ("1.5b", "7b", 1), ("7b", "72b", 4)]
CONCURRENCY = (1, 8, 32, 64)
DEFERRAL = {"routed": dict(), "deferred w2/b8": dict(max_llm_wait=2, llm_batch_min=8),
            "deferred w4/b16": dict(max_llm_wait=4, llm_batch_min=16),
            "deferred w8/b32": dict(max_llm_wait=8, llm_batch_min=32)}
PROMPTS = (32, 512, 4096)


def record_demo_traces(n: int):
    """The embedded arith pair: CITER at its default τ, and speculative k=4, greedy."""
    from citer import Engine, SamplingParams
    from citer.assets import shipped
    from citer.research.replay import record_traces
    from citer.research.tasks import get_task

    pair = shipped("arith")
    engine = Engine(pair["slm"], pair["llm"], pair["router"], max_model_len=256, num_blocks=4096, max_num_seqs=256)
    prompts = [p.prompt for p in get_task("arith").test_problems(n)]
    routed = record_traces(engine, prompts, SamplingParams(max_tokens=128, policy="router"))
    spec = record_traces(engine, prompts, SamplingParams(max_tokens=128, policy="speculative", num_draft_tokens=4))
    return routed, spec


def share(traces) -> float:
    return sum(sum(t.calls) for t in traces) / max(sum(t.new_tokens for t in traces), 1)


def run(traces, spec, device, requests: int):
    from citer.research.cost_model import QWEN2
    from citer.research.load_sim import simulate

    rows = []
    cases = [(s, l, tp, c, None, None) for s, l, tp in SHAPES for c in CONCURRENCY]
    cases += [("0.5b", "7b", 1, 32, p, None) for p in PROMPTS]
    cases += [("0.5b", "7b", 1, None, None, rate) for rate in (20.0, 60.0, 120.0)]
    for s, l, tp, c, plen, rate in tqdm(cases, desc="simulated loads"):
        kw = dict(num_requests=requests, concurrency=c, rate=rate, prompt_len=plen, llm_tp=tp)
        base = simulate(traces, QWEN2[s], QWEN2[l], device, "llm", **kw).summary()
        row = {"slm": s, "llm": l, "tp": tp, "concurrency": c, "rate": rate, "prompt_len": plen,
               "llm_alone": base}
        for name, d in DEFERRAL.items():
            row[name] = simulate(traces, QWEN2[s], QWEN2[l], device, "routed", **kw, **d).summary()
        row["speculative k=4"] = simulate(spec, QWEN2[s], QWEN2[l], device, "speculative", **kw).summary()
        rows.append(row)
    return rows


def table(rows, share_routed: float, share_spec: float) -> str:
    policies = list(DEFERRAL) + ["speculative k=4"]
    head = "| SLM/LLM | load | prompt | LLM alone tok/s, TPOT p50 ms | " + " | ".join(
        f"{p}: throughput / TPOT p50 / p99 / TTFT p50" for p in policies) + " |"
    lines = [f"CITER router traces: {share_routed:.1%} of tokens from the LLM; speculative: acceptance as recorded "
             f"({share_spec:.1%} LLM steps per token). Ratios to LLM alone (throughput: higher is better; "
             "latency: lower is better). Under Poisson arrivals every policy serves the offered load, so "
             "throughput ratios stay near 1 and latency is the measure.", "", head, "|" + "---|" * (4 + len(policies))]
    for r in rows:
        load = f"{r['concurrency']} closed" if r["concurrency"] else f"Poisson {r['rate']:g}/s"
        b = r["llm_alone"]
        cells = []
        for p in policies:
            x = r[p]
            cells.append(f"{x['throughput'] / b['throughput']:.2f}x / {x['tpot_p50'] / b['tpot_p50']:.2f} / "
                         f"{x['tpot_p99'] / b['tpot_p99']:.2f} / {x['ttft_p50'] / b['ttft_p50']:.2f}")
        name = f"{r['slm']}/{r['llm']}" + (f" (TP {r['tp']})" if r["tp"] > 1 else "")
        lines.append(f"| {name} | {load} | {r['prompt_len'] or 'recorded'} | {b['throughput']:.0f}, "
                     f"{1e3 * b['tpot_p50']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="H100", choices=["H100", "H200"])
    ap.add_argument("-n", type=int, default=200, help="arith problems whose decisions are recorded")
    ap.add_argument("--requests", type=int, default=256, help="requests per simulated run")
    ap.add_argument("--real-traces", help="a JSON list of traces (prompt_len, new_tokens, calls, kept)")
    ap.add_argument("--json")
    args = ap.parse_args()
    from citer.research.cost_model import DEVICES
    from citer.research.replay import Trace

    routed, spec = record_demo_traces(args.n)
    sets = {"arith CITER (embedded pair, default τ)": (routed, spec)}
    if args.real_traces:
        with open(args.real_traces) as f:
            real = [Trace(**t) for t in json.load(f)]
        sets[os.path.basename(args.real_traces)] = (real, spec)
    out = {}
    for name, (tr, sp) in sets.items():
        rows = run(tr, sp, DEVICES[args.device], args.requests)
        out[name] = {"device": args.device, "llm_share": share(tr), "rows": rows}
        print(f"\n### {name} on {args.device} (cost model: citer/research/cost_model.py)\n")
        print(table(rows, share(tr), share(sp)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
