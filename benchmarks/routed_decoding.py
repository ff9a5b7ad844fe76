"""Routed decoding cost on CPU: does the LLM catch-up cost what it should?

Random-weight Qwen2-shaped models (LLM ~100M parameters, SLM ~10M), batch 1, greedy,
prompt 32, 48 new tokens, median of several interleaved runs:
  transformers generate (LLM) | citer policy=llm | citer policy=slm | citer policy=random @ 0.15
Efficiency of the routed run = ideal / measured, ideal = SLM time + 0.15 x LLM time
(the cost if switching were free). The LLM pays its whole prompt prefill at its first call,
of which that ideal counts 15%: the prefill's time is measured too, and the efficiency
against an ideal that pays it in full is printed beside. Router overhead, measured in place by the profiler
(profile=True, policy "router"): the router's time (final norm, MLP, scores to the host)
as a share of the SLM's decode step where the SLM keeps every token (threshold 0: no score
is under it; the step includes the lm_head) and where every token goes to the LLM (threshold
1: every score is under it; the lm_head is skipped, so the step is the SLM's forward alone). --router takes a router folder or a
shipped router's name instead of the untrained seeded one (--router-dtype float16 saves
that one folded in float16, as shipped routers are stored). --neighbour runs everything
beside one CPU-bound process (a busy neighbour on a shared machine), started before the
timing and stopped after it.
Run: .venv/bin/python benchmarks/routed_decoding.py [--neighbour] [--slm DIR --llm DIR --router NAME]
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from common import (add_pair_args, add_run_args, build_pair, interleaved_medians, make_router, median,  # noqa: E402
                    num_params, timed)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    add_pair_args(ap)
    ap.add_argument("--fraction", type=float, default=0.15)
    ap.add_argument("--neighbour", action="store_true", help="time beside one CPU-bound process")
    ap.add_argument("--router", help="a router folder or shipped name (default: an untrained seeded router)")
    ap.add_argument("--router-dtype", default="float32", choices=["float32", "float16"],
                    help="the untrained router's stored precision (shipped routers: float16)")
    add_run_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from citer import Engine, SamplingParams

    slm_path, llm_path = build_pair(args)
    router_path = args.router or make_router(AutoModelForCausalLM.from_pretrained(slm_path).config.hidden_size,
                                             tempfile.mkdtemp(prefix="citer-router-"), dtype=args.router_dtype)
    hf = AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32).eval()
    engine = Engine(slm_path, llm_path, router_path, max_model_len=512, num_blocks=64)
    prompt = torch.randint(3, 30000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    n = args.new_tokens

    def citer(policy, tokens=n, **kw):
        def run():
            out = engine.generate([prompt], SamplingParams(max_tokens=tokens, ignore_eos=True, policy=policy, **kw))[0]
            assert len(out.token_ids) == tokens
            return out
        return run

    def run_hf():
        with torch.inference_mode():
            hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    routed = citer("random", llm_fraction=args.fraction, seed=0)
    fns = {
        "transformers LLM": lambda: timed(run_hf),
        "citer llm": lambda: timed(citer("llm")),
        "citer slm": lambda: timed(citer("slm")),
        f"citer random {args.fraction}": lambda: timed(routed),
        "citer llm prefill": lambda: timed(citer("llm", tokens=1)),  # the prompt's prefill and one head
    }
    for fn in fns.values():
        fn()
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.neighbour else None
    try:
        with tqdm(total=len(fns) * args.repeats, desc="routed decoding") as bar:
            res = interleaved_medians(fns, args.repeats, bar)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    t = {k: median(v) for k, v in res.items()}
    out = routed()
    share = out.llm_share

    # router overhead: the router's phase at batch 1 vs the SLM's decode step (measured by the profiler)
    engine = None  # free the timed engine's weights first (the real pair's are 9 GB in float32)
    prof = Engine(slm_path, llm_path, router_path, max_model_len=512, num_blocks=64, profile=True)
    router_share = {}
    for tau, step in ((0.0, "SLM step (keeps every token)"), (1.0, "SLM forward (every token to the LLM)")):
        stats = [prof.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True, policy="router",
                                                        threshold=tau))[0].stats for _ in range(args.repeats)]
        router_share[step] = median([s["router_time"] / s["slm_time"] for s in stats])

    ideal = t["citer slm"] + share * t["citer llm"]
    routed_t = t[f"citer random {args.fraction}"]
    print(f"\nLLM {args.llm} ({num_params(llm_path) / 1e6:.0f}M), SLM {args.slm} ({num_params(slm_path) / 1e6:.0f}M); "
          f"batch 1, prompt {args.prompt_len}, {n} new tokens, greedy fp32, {args.threads} threads, "
          f"median of {args.repeats} interleaved runs" + (", beside one CPU-bound process" if args.neighbour else ""))
    print(f"{'run':<22} {'ms/token':>9} {'vs transformers':>16}")
    prefill = t.pop("citer llm prefill")
    for k, v in t.items():
        print(f"{k:<22} {v / n * 1e3:>9.2f} {t['transformers LLM'] / v:>15.2f}x")
    print(f"routed run: LLM made {share:.1%} of tokens; ideal (SLM + share x LLM) {ideal / n * 1e3:.2f} ms/token; "
          f"efficiency {ideal / routed_t:.2f}; speed-up over transformers LLM {t['transformers LLM'] / routed_t:.2f}x")
    # the LLM pays its whole prompt prefill at its first call, where the ideal above counts a share of it
    with_prefill = t["citer slm"] + prefill + share * (t["citer llm"] - prefill)
    print(f"the LLM's prompt prefill takes {prefill * 1e3:.1f} ms (its whole generate with max_tokens=1); with it "
          f"paid in full the ideal is {with_prefill / n * 1e3:.2f} ms/token, efficiency {with_prefill / routed_t:.2f}")
    for step, fraction in router_share.items():
        print(f"router time / {step}: {fraction:.2%}")


if __name__ == "__main__":
    main()
