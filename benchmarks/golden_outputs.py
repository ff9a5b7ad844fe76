"""Record the engine's outputs on the embedded pairs for every policy, to compare two versions.

    python benchmarks/golden_outputs.py --out /tmp/new.json
    PYTHONPATH=/path/to/old/site python benchmarks/golden_outputs.py --out /tmp/old.json
    python benchmarks/golden_outputs.py --compare /tmp/old.json /tmp/new.json

A refactor that must not change behaviour is checked this way: greedy and seeded sampling,
every policy, verify on and off, speculative fixed and adaptive, n > 1, logprobs,
min_tokens, stop strings, a small max_num_seqs (requests queue) and the step API with
arrivals and an abort mid-run. Each output's tokens, text, provenance, router scores,
logprobs and forward-token counts are written exactly (floats as JSON doubles).
"""
import argparse
import json
import sys

POLICIES = [
    dict(policy="slm"), dict(policy="llm"), dict(policy="router"), dict(policy="router", threshold=0.999),
    dict(policy="random", llm_fraction=0.2), dict(policy="confidence", confidence_threshold=0.7),
    dict(policy="router", verify=True), dict(policy="confidence", confidence_threshold=0.8, verify=True),
    dict(policy="random", llm_fraction=0.1, verify=True), dict(policy="speculative", num_draft_tokens=3),
    dict(policy="speculative", num_draft_tokens=6, draft_confidence=0.9),
]
SAMPLING = [dict(), dict(temperature=0.8, top_p=0.9, seed=7), dict(temperature=1.0, top_k=5, seed=3)]
STATS = ("slm_forward_tokens", "llm_forward_tokens", "llm_calls", "slm_discarded_tokens", "llm_discarded_tokens")


def record(o) -> dict:
    lp = None
    if o.logprobs is not None:
        lp = [[x.token_id, x.logprob, [list(t) for t in x.top]] for x in o.logprobs]
    return {"id": o.request_id, "tokens": o.token_ids, "text": o.text, "finish": o.finish_reason,
            "from_llm": o.from_llm, "scores": o.router_scores, "logprobs": lp, "index": o.index,
            "stats": {k: o.stats.get(k) for k in STATS}}


def run(task: str, n_prompts: int, backend=None) -> dict:
    from citer import Engine, SamplingParams
    from citer.assets import shipped

    try:
        from citer.research.tasks import get_task
    except ImportError:
        from citer.tasks import get_task
    pair = shipped(task)
    prompts = [p.prompt for p in get_task(task).test_problems(n_prompts)]
    out = {}
    engine = Engine(pair["slm"], pair["llm"], pair["router"], max_model_len=256, num_blocks=2048, backend=backend)
    for pi, pol in enumerate(POLICIES):
        for si, samp in enumerate(SAMPLING):
            params = SamplingParams(max_tokens=40, **pol, **samp)
            out[f"{task}/p{pi}/s{si}"] = [record(o) for o in engine.generate(prompts, params)]
    extras = {
        "logprobs": SamplingParams(max_tokens=30, policy="router", logprobs=3),
        "min_tokens": SamplingParams(max_tokens=30, policy="confidence", min_tokens=25, ignore_eos=False),
        "stop": SamplingParams(max_tokens=40, policy="router", stop=["="], include_stop_str_in_output=True),
        "n3": SamplingParams(max_tokens=30, policy="random", llm_fraction=0.3, n=3, temperature=0.9, seed=11),
        "n2spec": SamplingParams(max_tokens=30, policy="speculative", n=2, temperature=0.7, seed=5),
        "ignore_eos": SamplingParams(max_tokens=60, policy="router", ignore_eos=True),
    }
    for name, params in extras.items():
        out[f"{task}/{name}"] = [record(o) for o in engine.generate(prompts[:8], params)]
    small = Engine(pair["slm"], pair["llm"], pair["router"], max_model_len=256, num_blocks=64, max_num_seqs=3,
                   backend=backend)
    out[f"{task}/queued"] = [record(o) for o in small.generate(prompts, SamplingParams(max_tokens=40, verify=True))]
    # the step API: arrivals over several steps, one abort
    ids, done, step = [], {}, 0
    for i, p in enumerate(prompts[:10]):
        ids.append(engine.add_request(p, SamplingParams(max_tokens=30, policy=POLICIES[i % len(POLICIES)]["policy"],
                                                        temperature=0.5 if i % 2 else 0.0, seed=i)))
        for ev in engine.step():
            if ev.output is not None:
                done[ev.request_id] = record(ev.output)
        if i == 6:
            aborted = engine.abort(ids[3])
            if aborted is not None:
                done[ids[3]] = record(aborted)
    while engine.has_unfinished_requests():
        for ev in engine.step():
            if ev.output is not None:
                done[ev.request_id] = record(ev.output)
        step += 1
    out[f"{task}/step_api"] = [done[k] for k in sorted(done)]
    return out


def compare(a_path: str, b_path: str) -> int:
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    bad = 0
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            bad += 1
            ra, rb = a.get(key) or [], b.get(key) or []
            for x, y in zip(ra, rb):
                if x != y:
                    diff = {k: (x.get(k), y.get(k)) for k in x if x.get(k) != y.get(k)}
                    print(f"MISMATCH {key} {x.get('id')}: {str(diff)[:600]}")
                    break
            else:
                print(f"MISMATCH {key}: {len(ra)} vs {len(rb)} outputs")
    print(f"{len(set(a) | set(b))} configurations, {bad} differ")
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--compare", nargs=2)
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--backend")
    args = ap.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    res = {}
    for task in ("arith", "arith-free"):
        res.update(run(task, args.n, args.backend))
    with open(args.out, "w") as f:
        json.dump(res, f)
    print(f"wrote {len(res)} configurations to {args.out}")


if __name__ == "__main__":
    main()
