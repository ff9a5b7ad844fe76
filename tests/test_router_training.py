"""Router training: the three label cases, round-2 relabelling, CITER-S, best-checkpoint
fitting, and a trained router folder that the engine loads and routes with.
Tiny random models and a toy task whose answer check any text can pass or fail."""
import json
import os

import numpy as np
import pytest
import torch

from citer import Engine, SamplingParams
from citer.research.tasks import Problem, Task
from citer.research.training import labels as L
from citer.research.training.router_train import fit_router, train_router


class ToyTask(Task):
    """Right when the continuation contains an 'e' (about half of random rollouts do)."""

    name = "toy"

    def __init__(self):
        rng = np.random.default_rng(0)
        letters = list("abcdfghij")
        self.problems = [Problem("Q: " + "".join(rng.choice(letters, 6)) + " A:", " sheep", 1) for _ in range(12)]

    def train_problems(self, n, rng):
        return [self.problems[i % len(self.problems)] for i in range(n)]

    def test_problems(self, n=None):
        return self.problems[:n]

    def extract_answer(self, text):
        return 1 if "e" in text else 0


MAX = 8


@pytest.fixture(scope="module")
def setup(hf_models):
    slm, llm = hf_models["qwen2"][0], hf_models["llama"][0]
    engine = Engine(slm, llm, block_size=8, num_blocks=256, max_model_len=128, max_num_seqs=128)
    return engine, L.Forcer(slm, llm), ToyTask()


def hf_rollout(model, tok, prefix, task, prob):
    with torch.no_grad():
        out = model.generate(torch.tensor([prefix]), max_new_tokens=MAX, do_sample=False, eos_token_id=2,
                             pad_token_id=0)
    text = tok.decode(out[0].tolist(), skip_special_tokens=True)
    return task.check(text.split(" A:", 1)[-1], prob)


def expected_round1(engine, hf_models, task, problems, rollout_model):
    """Labels recomputed from transformers directly: (counts, ordered case-3 labels)."""
    tok = engine.tokenizer
    slm_hf, llm_hf = hf_models["qwen2"][1], hf_models[rollout_model][1] if rollout_model else None
    counts = {"slm_right": 0, "llm_right": 0}
    rollout = []
    for p in problems:
        start = len(tok(p.prompt).input_ids)
        full = tok(p.prompt + p.solution).input_ids + [tok.eos_token_id]
        with torch.no_grad():
            s_pred = hf_models["qwen2"][1](torch.tensor([full])).logits[0].argmax(-1)
            l_pred = hf_models["llama"][1](torch.tensor([full])).logits[0].argmax(-1)
        for t in range(start, len(full)):
            if s_pred[t - 1] == full[t]:
                counts["slm_right"] += 1
            elif l_pred[t - 1] == full[t]:
                counts["llm_right"] += 1
            else:
                prefix = full[:t] + [int(s_pred[t - 1])]
                rollout.append(hf_rollout(llm_hf if llm_hf is not None else slm_hf, tok, prefix, task, p))
    return counts, rollout


def test_round1_three_cases_match_transformers(setup, hf_models):
    engine, forcer, task = setup
    problems = task.problems[:5]
    got = L.gold_labels(engine, forcer, task, problems, max_tokens=MAX)
    counts, rollout = expected_round1(engine, hf_models, task, problems, None)
    assert got.cases["slm_right"] == counts["slm_right"] and got.cases["llm_right"] == counts["llm_right"]
    assert got.cases["rollout_1"] + got.cases["rollout_0"] == len(rollout) > 0
    assert 0 < sum(rollout) < len(rollout), "the toy task should give both rollout outcomes"
    _, sig, y, w = got.tensors()
    assert sig.shape == (len(y), 3) and torch.equal(w, torch.ones(len(y)))
    assert y[-len(rollout):].tolist() == [float(r) for r in rollout]  # case-3 labels come last, in order
    assert y[: len(y) - len(rollout)].sum() == counts["slm_right"]  # case 1 -> 1, case 2 -> 0


def test_round2_relabels_with_the_router_in_the_loop(setup, hf_models, tmp_path):
    engine, forcer, task = setup
    problems = task.problems[:5]
    from citer.research.router_nets import RouterMLP, save_router

    torch.manual_seed(0)
    save_router(RouterMLP(64).eval(), str(tmp_path))
    engine.set_router(str(tmp_path))
    try:
        # τ = 0: the router never calls the LLM, so rollouts equal round 1's SLM-only ones
        r0 = L.gold_labels(engine, forcer, task, problems, router_threshold=0.0, max_tokens=MAX)
        r1 = L.gold_labels(engine, forcer, task, problems, max_tokens=MAX)
        assert torch.equal(r0.tensors()[2], r1.tensors()[2])
        # τ > 1: every rollout token comes from the LLM
        rl = L.gold_labels(engine, forcer, task, problems, router_threshold=1.01, max_tokens=MAX)
        _, rollout = expected_round1(engine, hf_models, task, problems, "llama")
        assert rl.tensors()[2][-len(rollout):].tolist() == [float(r) for r in rollout]
        # on-policy labels: only informative branch points, label 1 where the models agree
        op = L.on_policy_labels(engine, forcer, task, problems, threshold=0.5, max_tokens=MAX)
        x, _, y, _ = op.tensors()
        assert len(y) == op.cases["on_policy_1"] + op.cases["on_policy_0"] and x.shape[1] == 64
    finally:
        engine.set_router(None)


def test_citer_s_labels_case3_as_llm_without_rollouts(setup, monkeypatch):
    engine, forcer, task = setup

    def no_rollouts(*a, **k):
        raise AssertionError("CITER-S must not roll out")

    monkeypatch.setattr(L, "_rollouts", no_rollouts)
    got = L.gold_labels(engine, forcer, task, task.problems[:5], short_term=True)
    assert got.cases["rollout_1"] == 0 and got.cases["rollout_0"] > 0
    assert got.tensors()[2].sum() == got.cases["slm_right"]


def test_llm_agreement_labels_match_transformers(setup, hf_models, monkeypatch):
    """labels="llm-agreement": 1 exactly where the SLM's greedy token is the LLM's on the gold prefix."""
    engine, forcer, task = setup
    monkeypatch.setattr(L, "_rollouts", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no rollouts")))
    problems = task.problems[:4]
    got = L.gold_labels(engine, forcer, task, problems, labels="llm-agreement")
    tok, expect = engine.tokenizer, []
    for p in problems:
        start = len(tok(p.prompt).input_ids)
        full = tok(p.prompt + p.solution).input_ids + [tok.eos_token_id]
        with torch.no_grad():
            s_pred = hf_models["qwen2"][1](torch.tensor([full])).logits[0].argmax(-1)
            l_pred = hf_models["llama"][1](torch.tensor([full])).logits[0].argmax(-1)
        expect += [float(s_pred[t - 1] == l_pred[t - 1]) for t in range(start, len(full))]
    assert got.tensors()[2].tolist() == expect
    assert got.cases["agree"] == sum(expect) and got.cases["disagree"] == len(expect) - sum(expect)
    with pytest.raises(ValueError, match="unknown labels 'silver'"):
        L.gold_labels(engine, forcer, task, problems, labels="silver")


def test_hard_case_mining_keeps_hard_rows_and_reweights_easy_ones():
    g = torch.Generator().manual_seed(0)
    n = 4000
    top = torch.where(torch.rand(n, generator=g) < 0.5, 0.999, 0.6)  # half easy, half hard
    sig = torch.stack([torch.log(top / (1 - top)), torch.zeros(n), torch.zeros(n)], -1)
    s = L.LabelSet(easy_keep=0.25, seed=3)
    s.add(torch.randn(n, 8, generator=g), sig, torch.ones(n))
    _, sig_k, _, w = s.tensors()
    easy = torch.sigmoid(sig_k[:, 0]) >= L.EASY_TOP_PROB
    assert int((~easy).sum()) == int((top < 0.99).sum())  # every hard row kept, weight 1
    assert torch.all(w[~easy] == 1) and torch.all(w[easy] == 4)
    assert abs(float(w.sum()) - n) < 0.1 * n  # the weighted count estimates the full set
    assert s.cases["easy_dropped"] == n - len(s)


def _label_set(n, seed, rule=False):
    g = torch.Generator().manual_seed(seed)
    s = L.LabelSet()
    x = torch.randn(n, 16, generator=g)
    y = (x[:, 0] > -1.0).float() if rule else (torch.rand(n, generator=g) < 0.7).float()
    s.add(x, torch.randn(n, 3, generator=g), y)
    return s


@pytest.mark.parametrize("features", ["hidden", "hidden+head"])
def test_fit_keeps_the_epoch_with_the_best_routing_objective(features):
    from citer.research.token_metrics import routing_objective

    train, val = _label_set(300, 0, rule=True), _label_set(300, 1, rule=True)
    fit = fit_router(train, val, 16, features, epochs=12, lr=3e-3, batch_size=32, patience=12, progress=False)
    objectives = [h["val_objective"] for h in fit.history]
    assert objectives[fit.best_epoch] == max(objectives)
    vx, vs, vy, vw = val.tensors()
    with torch.no_grad():
        got = routing_objective(fit.router(vx, vs if fit.router.head_signals else None), vy, vw)
    assert got == pytest.approx(max(objectives), abs=1e-9)
    assert max(objectives) > 0.2  # it learned the rule (chance: the budgets, 4.5% on average)


def test_train_router_end_to_end_and_engine_routes_with_it(hf_models, tmp_path):
    task = ToyTask()
    out = str(tmp_path / "router")
    metrics = train_router(hf_models["qwen2"][0], hf_models["llama"][0], task, out, rounds=2, n_train=6, n_val=4,
                           max_tokens=MAX, easy_keep=0.5)
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    with open(os.path.join(out, "router_config.json")) as f:
        cfg = json.load(f)
    assert cfg["hidden_size"] == 64 and cfg["meta"]["rounds"][1]["threshold_in_loop"] is not None
    assert cfg["features"] == "hidden+head" and 0 <= metrics["default_threshold"]["llm_share"] <= 1
    engine = Engine(hf_models["qwen2"][0], hf_models["llama"][0], out, block_size=8, num_blocks=64, max_model_len=128)
    assert engine.router.default_threshold == metrics["default_threshold"]["threshold"]
    o = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True, policy="router"))[0]
    assert all(0.0 < s < 1.0 for s in o.router_scores)


def test_pair_report_token_error_rates(setup, hf_models):
    from citer.research.tasks import get_task
    from citer.research.training.report import token_error_rates

    engine, forcer, _ = setup
    tok = engine.tokenizer
    problems = get_task("arith").test_problems(3)
    rates = token_error_rates(forcer, tok, problems)
    # independent count of digit tokens among the gold solution tokens (+ eos)
    digits = total = 0
    for p in problems:
        ids = tok(p.prompt + p.solution).input_ids + [tok.eos_token_id]
        sol = ids[len(tok(p.prompt).input_ids):]
        digits += sum(tok.decode([t]).strip().isdigit() for t in sol)
        total += len(sol)
    assert rates["slm"]["digit_share_of_tokens"] == digits / total
    for m in ("slm", "llm"):
        assert 0.0 <= rates[m]["digit_error_rate"] <= 1.0 and 0.0 <= rates[m]["other_error_rate"] <= 1.0
    # random models are wrong almost everywhere
    assert rates["slm"]["other_error_rate"] > 0.5


def test_recall_threshold_reaches_its_target_with_few_labels():
    """Two positions labelled 0 and a target recall of 0.9: both go to the LLM (linear
    interpolation put τ between them, and the router reached 0.5)."""
    from citer.research.training.labels import LabelSet
    from citer.research.training.router_train import recall_threshold

    class FirstFeature(torch.nn.Module):
        head_signals = False

        def forward(self, x, s=None):
            return x[:, 0]

    labels = LabelSet()
    labels.add(torch.tensor([[-3.0], [-1.0], [0.0], [1.0], [2.0], [3.0]]), torch.zeros(6, 5),
               torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]))
    assert recall_threshold(FirstFeature(), labels, 0.9)["recall"] == 1.0


def test_rollouts_and_routed_runs_use_the_tasks_stop_strings(setup, router_path, monkeypatch):
    """The label pipeline generates as evaluation does: with the task's per-problem stop
    strings (a JSONL line's "stop"); the rollouts and round-2 runs once went without them."""
    from dataclasses import replace

    engine, forcer, task = setup
    problems = task.problems[:2]
    seen, real = [], engine.generate
    monkeypatch.setattr(task, "sampling_params", lambda ps, params: [replace(params, stop=["sh"])] * len(ps))
    monkeypatch.setattr(engine, "generate", lambda prompts, params, **kw: seen.append(params) or real(prompts, params,
                                                                                                      **kw))
    prefix = engine.tokenizer(problems[0].prompt).input_ids
    L._rollouts(engine, task, [prefix], problems[:1], "slm", None, MAX)
    engine.set_router(router_path)
    try:
        L.on_policy_labels(engine, forcer, task, problems, 0.5, max_tokens=MAX)
    finally:
        engine.set_router(None)
    assert len(seen) >= 2 and all(isinstance(ps, list) and all(p.stop == ["sh"] for p in ps) for ps in seen)
