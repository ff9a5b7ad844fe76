"""Decode on a GPU: CUDA graphs vs eager, the weight-bandwidth bound, the router's cost,
routed decoding and transformers, with random weights at real Qwen2 shapes.

SLM = Qwen2-0.5B shape, LLM = Qwen2-1.5B shape (bf16, vocab 151936, tied embeddings),
a random router. One engine per mode (CUDA graphs, enforce_eager) holds both models.
For each batch size: prompts of --prompt-len tokens are prefilled, then --steps decode
steps are timed (engine.step(), host work included); ms/step is the median over
--repeats runs of the mean step time. Rows:
  slm / llm              one model decodes alone (policy slm / llm)
  slm+router             the SLM step with the router fused in (threshold 0: never routes)
  routed@F               policy random, LLM share F: SLM every step + LLM catch-ups
  transformers llm       transformers generate (sdpa, dynamic cache), same LLM weights
Derived: graph speed-up (eager / graphs), bound = (weights streamed per step + KV read)
/ measured device copy bandwidth and its share of the measured step, router overhead =
slm+router / slm - 1, routed efficiency = (slm + F x llm) / routed (the batch-1 ideal;
at larger batches lanes route independently, so most steps have some LLM catch-up).

Run: python benchmarks/decode_gpu.py          (CUDA; --shapes tiny --device cpu --modes eager
smoke-tests it on a CPU). `gpu_check.sh quick` runs --batches 1 --modes graphs with a
--json file for its summary table.
"""
import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from common import build_random_qwen2, median, scratch_dir  # noqa: E402

SHAPES = {"real": ("qwen2-0.5b", "qwen2-1.5b"), "tiny": ("qwen2-tiny", "qwen2-10m")}


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    if device != "cuda":
        return float("nan")
    import triton.testing

    x = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300)
    return 2 * x.numel() * 4 / (ms * 1e-3)


def streamed_bytes(engine, which: str, batch: int, ctx: int) -> int:
    """Bytes one decode step must read: every weight once (the tied embedding once, as
    the lm_head) plus the KV cache of `batch` sequences of `ctx` tokens."""
    runner = getattr(engine.core, which)
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())  # a tied weight once
    return weights + runner.cfg.kv_bytes_per_token(runner.dtype) * batch * ctx


def time_steps(engine, prompts, params, steps: int) -> float:
    """Mean seconds per decode step after the prefill step."""
    ids = [engine.add_request(p, params) for p in prompts]
    engine.step()  # prefill + first token
    sync = torch.cuda.synchronize if engine.config.device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    for rid in ids:
        engine.abort(rid)
    return dt


def time_transformers(hf, prompts, steps: int, device: str) -> float:
    batch = torch.tensor(prompts, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def gen(n):
        with torch.inference_mode():
            hf.generate(batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync()

    t0 = time.perf_counter()
    gen(1)
    t1 = time.perf_counter()
    gen(steps + 1)
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / steps  # decode steps only, the prefill subtracted


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", choices=SHAPES, default="real")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.15)
    ap.add_argument("--modes", nargs="+", choices=("graphs", "eager"), default=["graphs", "eager"])
    ap.add_argument("--max-graph-query-len", type=int, default=32)
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers generate rows")
    ap.add_argument("--json", help="also write the table and the derived numbers to this file")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from citer import Engine, SamplingParams
    from citer.engine.models import load_model_config
    from citer.research.router_nets import RouterMLP, save_router

    dtype = getattr(torch, args.dtype)
    root = scratch_dir()
    slm_name, llm_name = SHAPES[args.shapes]
    init_dev = args.device if args.device == "cuda" else "cpu"
    slm = build_random_qwen2(slm_name, root, seed=2, dtype=dtype, device=init_dev)
    llm = build_random_qwen2(llm_name, root, seed=1, dtype=dtype, device=init_dev)
    router = os.path.join(root, f"router-{slm_name}")
    if not os.path.isfile(os.path.join(router, "config.json")):
        torch.manual_seed(0)
        save_router(RouterMLP(load_model_config(slm).hidden_size).eval(), router, default_threshold=0.5)
    bw = copy_bandwidth(args.device)
    max_len = args.prompt_len + args.steps + 8
    modes, capture = {}, ""
    if args.device != "cuda" and "graphs" in args.modes:
        raise SystemExit("--modes graphs needs --device cuda (CUDA graphs are CUDA-only)")
    capture_s = None
    for mode in args.modes:
        modes[mode] = Engine(slm, llm, router, device=args.device, dtype=args.dtype, max_model_len=max_len,
                             max_num_seqs=max(args.batches), enforce_eager=mode == "eager",
                             max_graph_query_len=args.max_graph_query_len)
        if mode == "graphs":
            t0 = time.perf_counter()
            n = modes[mode].capture_cuda_graphs()
            capture_s = time.perf_counter() - t0
            capture = f"; {n} CUDA graphs captured up front in {capture_s:.1f} s"
    hf = None if args.no_transformers else AutoModelForCausalLM.from_pretrained(llm, dtype=dtype).to(args.device).eval()

    base = dict(max_tokens=args.steps + 1, ignore_eos=True)
    policies = {
        "slm": dict(policy="slm"),
        "slm+router": dict(policy="router", threshold=0.0),
        "llm": dict(policy="llm"),
        f"routed@{args.fraction:g}": dict(policy="random", llm_fraction=args.fraction),
    }
    g = torch.Generator().manual_seed(0)
    res = {}
    total = len(args.batches) * (len(modes) * len(policies) + (hf is not None)) * args.repeats
    with tqdm(total=total, desc="decode") as bar:
        for batch in args.batches:
            prompts = [torch.randint(3, 30000, (args.prompt_len,), generator=g).tolist() for _ in range(batch)]
            for mode, engine in modes.items():
                for name, pol in policies.items():
                    params = SamplingParams(**base, **pol)  # seeds per request: lanes route independently
                    time_steps(engine, prompts, params, args.steps)  # warm-up: compiles what this run meets
                    runs = []
                    for _ in range(args.repeats):
                        runs.append(time_steps(engine, prompts, params, args.steps))
                        bar.update(1)
                    res[(batch, mode, name)] = median(runs)
            if hf is None:
                continue
            time_transformers(hf, prompts, 2, args.device)  # warm-up
            runs = []
            for _ in range(args.repeats):
                runs.append(time_transformers(hf, prompts, args.steps, args.device))
                bar.update(1)
            res[(batch, "transformers", "llm")] = median(runs)

    eng = next(iter(modes.values()))
    ctx = args.prompt_len + args.steps // 2
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"\n{args.shapes} shapes ({slm_name} SLM, {llm_name} LLM), {args.dtype}, device {device}, prompt "
          f"{args.prompt_len}, {args.steps} decode steps, median of {args.repeats}; copy bandwidth "
          f"{bw / 1e9:.0f} GB/s{capture}")
    print(f"{'batch':>5} {'mode':>12} {'policy':>14} {'ms/step':>9} {'bound ms':>9} {'% of bound':>10}")
    rows = []
    for (batch, mode, name), sec in res.items():
        which = "slm" if name.startswith("slm") else "llm" if name == "llm" else None
        bound = streamed_bytes(eng, which, batch, ctx) / bw if which else float("nan")
        pct = 100 * bound / sec if which else float("nan")
        rows.append(dict(batch=batch, mode=mode, policy=name, ms_per_step=sec * 1e3, bound_ms=bound * 1e3,
                         pct_of_bound=pct))
        print(f"{batch:>5} {mode:>12} {name:>14} {sec * 1e3:>9.3f} {bound * 1e3:>9.3f} {pct:>10.1f}")
    print("\nderived")
    routed = f"routed@{args.fraction:g}"
    derived = []
    for batch in args.batches:
        hf_sec = res.get((batch, "transformers", "llm"), float("nan"))
        for mode in modes:
            r = {k[2]: v for k, v in res.items() if k[0] == batch and k[1] == mode}
            d = dict(batch=batch, mode=mode, router_overhead_pct=100 * (r["slm+router"] / r["slm"] - 1),
                     routed_efficiency=(r["slm"] + args.fraction * r["llm"]) / r[routed],
                     routed_vs_llm=r["llm"] / r[routed], routed_vs_transformers=hf_sec / r[routed],
                     llm_vs_transformers=hf_sec / r["llm"])
            derived.append(d)
            print(f"batch {batch:>3} {mode:>6}: router overhead {d['router_overhead_pct']:+.2f}%  routed efficiency "
                  f"{d['routed_efficiency']:.2f}  routed vs llm-only {d['routed_vs_llm']:.2f}x  routed vs "
                  f"transformers llm {d['routed_vs_transformers']:.2f}x  llm vs transformers "
                  f"{d['llm_vs_transformers']:.2f}x")
        if "graphs" in modes and "eager" in modes:
            sp = {n: res[(batch, "eager", n)] / res[(batch, "graphs", n)] for n in policies}
            print(f"batch {batch:>3} graph speed-up (eager / graphs): "
                  + "  ".join(f"{n} {v:.2f}x" for n, v in sp.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shapes=[slm_name, llm_name], dtype=args.dtype, device=device, copy_GBps=bw / 1e9,
                           capture_s=capture_s, fraction=args.fraction, rows=rows, derived=derived), f, indent=1)


if __name__ == "__main__":
    main()
