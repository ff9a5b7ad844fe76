"""The cost model's counts against hand computations, its calibration against gpt-fast's
published batch-1 numbers, and the load simulator: recorded decisions replayed through the
engine's own core take exactly the steps the engine takes on the same decisions."""
import pytest

from citer import Engine, SamplingParams
from citer.research.cost_model import (DEVICES, QWEN2, Shape, Step, calibration_check, decode_step, step_bytes,
                                       step_flops, step_time, tp_table)
from citer.research.load_sim import simulate
from citer.research.replay import record_traces, replaying
from conftest import random_prompts


def test_counts_match_hand_computation():
    # a toy shape by hand: hidden 8, 2 layers, 2 heads of 4, 1 KV head, MLP 16, vocab 10, q/k/v biases
    s = Shape("toy", hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16, vocab=10, tied=True)
    layer = 8 * 8 + 2 * 8 * 4 + 8 * 8 + (8 + 2 * 4) + 3 * 8 * 16 + 2 * 8  # q, k+v, o, biases, MLP, 2 norms
    assert s.layer_params == layer == 608
    assert s.body_params == 2 * 608 + 8 == 1224 and s.lm_head_params == 80
    assert s.kv_bytes_per_token(2) == 2 * 2 * 1 * 4 * 2
    step = Step(((3, 10), (1, 5)), head_rows=2)  # a 3-token catch-up at context 10, a decode at 5
    assert step_bytes(s, step) == 2 * (1224 + 80) + (10 + 5) * 32 + (3 + 1) * 32
    keys = (8 + 9 + 10) + 5  # the catch-up's tokens attend over 8, 9, 10 keys; the decode over 5
    assert step_flops(s, step) == 2 * 1224 * 4 + 2 * 80 * 2 + 4 * 2 * 4 * keys * 2
    # Qwen2-7B: published 7.6B parameters with its 545M-parameter embedding and 545M lm_head
    q7 = QWEN2["7b"]
    assert abs((q7.body_params + 2 * q7.lm_head_params) / 1e9 - 7.62) < 0.02
    assert q7.kv_bytes_per_token(2) == 2 * 28 * 4 * 128 * 2
    assert step_bytes(q7, decode_step(1, 100)) == q7.weight_bytes(2) + 100 * 57344 + 57344


def test_calibration_against_gpt_fast_and_tp_paper_numbers():
    for name, (measured, modelled) in calibration_check().items():
        assert abs(modelled / measured - 1) < 0.1, name
    t = tp_table(QWEN2["72b"], DEVICES["H100"])
    assert t[1]["allreduce_bytes_per_step"] == 0 and t[8]["allreduce_bytes_per_step"] == 2 * 80 * 8192 * 2
    assert t[1]["step_ms_nvlink"] > t[2]["step_ms_nvlink"] > t[8]["step_ms_nvlink"]
    assert t[8]["comm_ms_pcie"] > t[8]["comm_ms_nvlink"]
    h = DEVICES["H100"]
    assert step_time(q := QWEN2["0.5b"], decode_step(32, 512), h) < step_time(QWEN2["7b"], decode_step(1, 512), h)
    assert q.name == "Qwen2-0.5B"


@pytest.mark.parametrize("wait", [0, 3])
def test_the_simulator_takes_the_engines_steps(hf_models, router_path, wait):
    """Traces recorded from the tiny pair, replayed through a real Engine and through the
    simulator: the same LLM and SLM steps (the simulator is the engine's core)."""
    slm, llm = hf_models["qwen2"][0], hf_models["llama"][0]
    kw = dict(block_size=8, num_blocks=256, max_model_len=96)
    rec = Engine(slm, llm, router_path, **kw)
    prompts = random_prompts(6, 3, 9, seed=2)
    params = [SamplingParams(max_tokens=12, ignore_eos=True, policy="random", llm_fraction=0.3, seed=i)
              for i in range(6)]
    traces = record_traces(rec, prompts, params)
    assert sum(sum(t.calls) for t in traces) > 3
    real = Engine(slm, llm, router_path, max_llm_wait=wait, llm_batch_min=4, **kw)
    steps = {"slm": 0, "llm": 0}
    for name in steps:
        runner = getattr(real.core, name)
        fn = runner.run
        runner.run = (lambda f, n: (lambda *a, **k: steps.__setitem__(n, steps[n] + 1) or f(*a, **k)))(fn, name)
    with replaying({f"r{i}": t.to_json() for i, t in enumerate(traces)}):
        ids = [real.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True, policy="random",
                                                 llm_fraction=0.3), request_id=f"r{i}") for i, p in enumerate(prompts)]
        outs = {}
        while real.has_unfinished_requests():
            outs.update({ev.request_id: ev.output for ev in real.step() if ev.output is not None})
    sim = simulate(traces, QWEN2["0.5b"], QWEN2["7b"], DEVICES["H100"], "routed", num_requests=6, concurrency=6,
                   max_llm_wait=wait, llm_batch_min=4)
    assert (sim.slm_steps, sim.llm_steps) == (steps["slm"], steps["llm"])
    assert sim.tokens == sum(len(outs[i].token_ids) for i in ids)
