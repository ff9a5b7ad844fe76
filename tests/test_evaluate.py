"""citer eval: the sweep, the baselines (query-level, Co-LLM-style), the oracle, the
bootstrap statistics, fresh problems, the token report, table and plots; tiny random
models and a toy task."""
import json
import os

import numpy as np
import pytest
import torch

from citer import Engine, SamplingParams
from citer.research.eval_stats import Bootstrap, mean_accuracy, share_to_reach, summarize
from citer.research.evaluate import ROUTER_TAUS, evaluate, fresh_problems, query_level_rows, sweep, table, write, write_eval
from citer.research.router_nets import RouterMLP, save_router
from citer.research.tasks import get_task
from test_router_training import ToyTask


class DrawnToyTask(ToyTask):
    """The toy's 12 prompts drawn at random from the rng, as a real task draws its problems."""

    def train_problems(self, n, rng):
        return [self.problems[i] for i in rng.integers(0, len(self.problems), n)]


@pytest.fixture(scope="module")
def engine(hf_models, tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("r"))
    save_router(RouterMLP(64, features="hidden+head").eval(), path)
    return Engine(hf_models["qwen2"][0], hf_models["llama"][0], path, block_size=8, num_blocks=128,
                  max_model_len=128, max_num_seqs=8)


def test_sweep_covers_every_method_and_writes_json_and_plot(engine, tmp_path):
    own = engine.paths["router"]
    save_router(RouterMLP(64).eval(), str(tmp_path / "rs"))
    rows = sweep(engine, ToyTask(), n=4, router_s=str(tmp_path / "rs"), max_tokens=6, progress=False)
    methods = {r["method"] for r in rows}
    assert methods == {"slm", "llm", "random", "confidence", "CITER", "CITER-S"}
    by = {r["method"]: r for r in rows if r["knob"] is None}
    assert by["slm"]["llm_share"] == 0.0 and by["llm"]["llm_share"] == 1.0
    assert by["slm"]["llm_forward_tokens"] == 0 and by["llm"]["slm_forward_tokens"] == 0
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["ms_per_token"] > 0 for r in rows)
    for r in rows:  # per-problem results add up to the row
        pp = r["per_problem"]
        assert np.mean(pp["correct"]) == r["accuracy"] and sum(pp["tokens"]) == r["tokens"]
    out = tmp_path / "eval"
    write(rows, str(out), "toy")
    with open(out / "eval.json") as f:
        assert json.load(f) == [{k: v for k, v in r.items() if k != "per_problem"} for r in rows]
    assert os.path.getsize(out / "accuracy_vs_llm_share.png") > 10_000
    assert table(rows).splitlines()[0].split()[:2] == ["method", "knob"]
    assert engine.paths["router"] == own  # the sweep restores the engine's router


def test_head_signal_router_at_init_routes_like_confidence(engine):
    """An untrained hidden+head router is the confidence rule: at τ = c it sends the same
    tokens to the LLM as policy confidence at threshold c."""
    prompts = [p.prompt for p in ToyTask().problems[:4]]
    for c in (0.05, 0.1):
        a = engine.generate(prompts, SamplingParams(max_tokens=6, policy="router", threshold=c, ignore_eos=True))
        b = engine.generate(prompts, SamplingParams(max_tokens=6, policy="confidence", confidence_threshold=c,
                                                    ignore_eos=True))
        assert [o.from_llm for o in a] == [o.from_llm for o in b]
        assert [o.token_ids for o in a] == [o.token_ids for o in b]


def _pp(correct, tokens, llm):
    return {"correct": correct, "tokens": tokens, "llm_tokens": llm}


def test_bootstrap_statistics_on_a_known_curve():
    n = 400
    rng = np.random.default_rng(0)
    slm = _pp(rng.random(n) < 0.5, [10] * n, [0] * n)
    llm = _pp(np.ones(n, bool), [10] * n, [10] * n)
    good = [_pp(np.arange(n) > 0, [10] * n, [1] * n)]  # 99.75% at 10% share
    bad = [_pp(rng.random(n) < 0.6, [10] * n, [1] * n)]
    boot = Bootstrap(n, 200)
    cg, cb = boot.curve(good, slm, llm), boot.curve(bad, slm, llm)
    reach = share_to_reach(cg, 0.01)
    assert np.mean(reach <= 0.1 + 1e-9) > 0.95 and np.median(reach) > 0.05
    assert np.all(share_to_reach(cb, 0.01) > 0.5)  # only by mixing in LLM-only queries
    assert np.all(mean_accuracy(cg) > mean_accuracy(cb))
    s = summarize({"good": cg, "confidence": cb})
    lo, hi = s["good"]["area_minus_confidence_ci"]
    assert 0 < lo <= s["good"]["area_minus_confidence"] <= hi and s["good"]["p_below_confidence"] == 0


def test_query_level_rows_combine_the_single_model_runs():
    slm = {"per_problem": _pp([False, True, False, True], [5, 5, 5, 5], [0] * 4), "ms_per_token": 1.0}
    llm = {"per_problem": _pp([True] * 4, [6, 6, 6, 6], [6] * 4), "ms_per_token": 2.0}
    rows = query_level_rows(np.array([0.1, 0.9, 0.2, 0.8]), slm, llm, shares=(0.25, 0.5))
    assert [r["accuracy"] for r in rows] == [0.75, 1.0]
    assert rows[1]["llm_share"] == 12 / 22 and rows[1]["per_problem"]["tokens"] == [6, 5, 6, 5]


def test_fresh_problems_skip_what_routers_trained_on():
    task = get_task("arith")
    meta = {"n_train": 50, "n_val": 10, "seed": 0}
    seen = {p.prompt for p in task.train_problems(60, np.random.default_rng(777))}
    fresh = fresh_problems(task, 40, 777, [meta])  # the very stream training drew from
    assert len(fresh) == 40 and not seen & {p.prompt for p in fresh}
    assert not {p.prompt for p in task.test_problems()} & {p.prompt for p in fresh}


def test_fresh_problems_say_when_the_task_runs_out():
    """A task with fewer unseen prompts than asked for is an error that names the counts, not a hang."""
    task = DrawnToyTask()  # 12 distinct prompts
    seen = {p.prompt for p in task.train_problems(8, np.random.default_rng(777))}
    k = 12 - len(seen)
    assert len(fresh_problems(task, k, 0, [{"n_train": 8}])) == k
    with pytest.raises(ValueError, match=f"only {k} of {k + 1} problems"):
        fresh_problems(task, k + 1, 0, [{"n_train": 8}])


def test_baselines_train_load_and_route(hf_models, tmp_path):
    from citer.research.baselines import QueryRouter, train_baselines
    from citer.engine.models.router import load_router

    slm, llm = hf_models["qwen2"][0], hf_models["llama"][0]
    info = train_baselines(slm, llm, ToyTask(), str(tmp_path), n_train=12, max_tokens=6, seed=3)
    assert 0 <= info["colm"]["weak_defer_share"] <= 1 and info["colm"]["nll"] <= info["colm"]["nll_weak_init"]
    qr = QueryRouter.load(str(tmp_path / "query"))
    from citer.research.router_nets import load_router_mlp

    for meta in (qr.meta, load_router_mlp(str(tmp_path / "colm"))[1]["meta"]):  # what evaluation's leakage check
        assert (meta["n_train"], meta["seed"]) == (12, 3)  # redraws: the problems each was trained on
    colm = load_router(str(tmp_path / "colm"), 64)
    h = torch.randn(5, 64)
    with torch.no_grad():
        ref = torch.sigmoid(colm_net(tmp_path)(h))
    assert torch.allclose(colm.score(h), ref, atol=1e-6)  # the linear head folds exactly
    engine = Engine(slm, llm, str(tmp_path / "colm"), block_size=8, num_blocks=64, max_model_len=128)
    outs = engine.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=5, policy="router", threshold=0.5,
                                                              ignore_eos=True))
    assert all(all(0 < s < 1 for s in o.router_scores) for o in outs)
    from citer.research.training.forcing import Forcer

    pol = qr.policies(Forcer(slm, llm), engine.tokenizer, ["Q: abc A:", "Q: x A:"], threshold=2.0)
    assert pol == ["llm", "llm"]
    with pytest.raises(ValueError, match="is not 'citer-query-router'"):
        QueryRouter.load(str(tmp_path / "colm").replace("colm", "colm_cfg") if False else _bad_query(tmp_path))


def test_colm_marginal_likelihood_weighs_what_is_at_stake():
    """Co-LLM's objective by hand, and what it changes from the weak labels: positions where
    both models are near-certain (the LLM a little more) and SLM mistakes the LLM fixes carry
    the same weak label (defer), so a head fit on the labels cannot tell them apart; the
    marginal likelihood weighs the mistakes ~50x more and learns the feature that flags them."""
    from citer.research.baselines import _fit_logistic, colm_marginal_nll, fit_colm_head
    from citer.research.token_metrics import auroc

    keep, slm, llm = torch.tensor([0.3, -1.2]), torch.log(torch.tensor([0.9, 0.05])), torch.log(torch.tensor([0.5, 0.95]))
    p = torch.sigmoid(keep)
    by_hand = -torch.log(p * slm.exp() + (1 - p) * llm.exp()).mean()
    assert torch.allclose(colm_marginal_nll(keep, slm, llm), by_hand)
    g = torch.Generator().manual_seed(0)
    group = torch.cat([torch.full((n,), i) for i, n in enumerate((1200, 120, 400))])  # easy, mistake, SLM better
    x = torch.randn(len(group), 2, generator=g)
    x[:, 0] += 2.0 * (group == 2)  # feature 0 flags where the SLM is better, feature 1 (noisily) the mistakes
    x[:, 1] += 1.5 * (group == 1)
    p_slm = torch.tensor([0.98, 0.05, 0.9])[group]
    p_llm = torch.tensor([0.999, 0.95, 0.5])[group]
    far = x * 300 + 40  # a real hidden state's scale: the head standardizes inside and folds it back
    head = fit_colm_head(far, p_slm.log(), p_llm.log(), epochs=30)
    weak = _fit_logistic(x, (p_llm <= p_slm).float(), epochs=30)
    assert head.meta["weak_defer_share"] == pytest.approx(1320 / 1720) and head.meta["nll"] < head.meta["nll_weak_init"]
    deferred = group < 2  # among the positions the weak labels defer: P(a mistake scores under an easy one)
    with torch.no_grad():
        ml_auc = auroc(head(far)[deferred], (group[deferred] == 0).float())
        weak_auc = auroc(weak(x).squeeze(-1)[deferred], (group[deferred] == 0).float())
    assert ml_auc > 0.6 and ml_auc > weak_auc + 0.1, (ml_auc, weak_auc)  # measured: 0.68 against 0.49


def colm_net(tmp_path):
    from citer.research.router_nets import load_router_mlp

    return load_router_mlp(str(tmp_path / "colm"))[0]


def _bad_query(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architecture": "citer-router-mlp"}))
    return str(d)


def test_evaluate_end_to_end(engine, tmp_path, hf_models):
    """Every part of `citer eval` on a toy: oracle rows reach the LLM's answers, CIs
    bracket the points, a summary per curve, a token report per score."""
    from citer.research.baselines import train_baselines

    task = DrawnToyTask()
    train_baselines(hf_models["qwen2"][0], hf_models["llama"][0], task, str(tmp_path / "b"), n_train=8,
                    max_tokens=6)
    # 12 prompts, the Co-LLM head trained on 8 draws: some prompts stay fresh
    result = evaluate(engine, task, n=3, seed=1, routers={"Co-LLM": str(tmp_path / "b" / "colm")},
                      query_router=str(tmp_path / "b" / "query"), max_tokens=6, n_boot=50)
    methods = {r["method"] for r in result["rows"]}
    assert {"oracle", "query-level", "Co-LLM", "CITER", "confidence"} <= methods
    colm = json.loads((tmp_path / "b" / "colm" / "router_config.json").read_text())
    assert [r["knob"] for r in result["rows"] if r["method"] == "Co-LLM"] == colm["meta"]["sweep_taus"]
    assert colm["default_threshold"] == colm["meta"]["default_threshold"]  # its τ at a 10% share, not 0.5
    assert [r["knob"] for r in result["rows"] if r["method"] == "CITER"] == list(ROUTER_TAUS)
    for r in result["rows"]:
        assert r["accuracy_ci"][0] - 1e-9 <= r["accuracy"] <= r["accuracy_ci"][1] + 1e-9
    assert set(result["summary"]) >= {"CITER", "confidence", "oracle", "query-level"}
    assert set(result["token_report"]["scores"]) == {"confidence", "CITER", "Co-LLM"}
    write_eval(result, str(tmp_path / "out"), "toy")
    assert os.path.isfile(tmp_path / "out" / "accuracy_vs_llm_share_0_20.png")


def test_oracle_at_large_k_is_the_llm(engine, hf_models):
    """Replacing every mismatch gives exactly the LLM's greedy answer, one LLM token per replacement."""
    from citer.research.oracle import oracle_points
    from citer.research.training.forcing import Forcer

    task = ToyTask()
    problems = task.problems[:4]
    forcer = Forcer(hf_models["qwen2"][0], hf_models["llama"][0])
    pts = oracle_points(engine, forcer, task, problems, ks=(1, 30), max_tokens=6)
    llm = engine.generate([p.prompt for p in problems], SamplingParams(max_tokens=6, policy="llm"))
    assert pts[1]["tokens"].tolist() == [len(o.token_ids) for o in llm]
    assert pts[1]["correct"].tolist() == [task.check(o.text, p) for o, p in zip(llm, problems)]
    assert np.all(pts[0]["llm_tokens"] <= 1) and np.all(pts[1]["llm_tokens"] >= pts[0]["llm_tokens"])
