"""`citer eval --data` end to end on the tiny models and a toy JSONL: every method's points,
knobs chosen by target share, paired summaries against the confidence rule, the oracle,
timing, the files written, and a resumed run that recomputes nothing."""
import json
import os

import pytest

from citer import Engine
from citer.research import data_eval as DE
from citer.research.tasks.jsonl import JsonlTask


def _toy(tmp_path, n=6):
    path = tmp_path / "toy.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Q: {i} + {i}? A:", "answer": str(2 * i), "stop": ["\n"]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def engine(hf_models, router_path):
    return Engine(hf_models["qwen2"][0], hf_models["llama"][0], router_path, block_size=8, num_blocks=256,
                  max_model_len=96, max_llm_wait=2)


def test_evaluate_data_end_to_end_and_resume(engine, router_path, tmp_path, monkeypatch):
    task = JsonlTask(eval_data=_toy(tmp_path), tokenizer=engine.tokenizer, checker="exact", extract="last-number")
    problems = task.test_problems()
    out = str(tmp_path / "eval")
    res = DE.evaluate_data(engine, task, problems, {"CITER": router_path}, out, max_tokens=6, shares=(0.1, 0.3),
                           verify_shares=(0.1,), oracle_ks=(1, 2), n_boot=50)
    methods = {r["method"] for r in res["rows"]}
    assert {"slm", "llm", "CITER", "confidence", "random", "CITER + verify", "speculative", "oracle"} <= methods
    assert {"CITER", "confidence", "oracle"} <= set(res["summary"])
    s = res["summary"]["CITER"]
    assert "area_minus_confidence_ci" in s and "share_ratio_to_confidence" in s
    spec = next(r for r in res["rows"] if r["method"] == "speculative")
    llm = next(r for r in res["rows"] if r["method"] == "llm")
    assert spec["per_problem"]["correct"] == llm["per_problem"]["correct"]  # lossless
    for r in res["rows"]:
        assert r["accuracy_ci"][0] - 1e-9 <= r["accuracy"] <= r["accuracy_ci"][1] + 1e-9
    # a second run reads every point from points.jsonl
    monkeypatch.setattr(DE, "run_point", lambda *a, **k: pytest.fail("recomputed a logged point"))
    again = DE.evaluate_data(engine, task, problems, {"CITER": router_path}, out, max_tokens=6, shares=(0.1, 0.3),
                             verify_shares=(0.1,), oracle_ks=(1, 2), n_boot=50)
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in res["rows"]]
    for kw, what in ((dict(max_tokens=4), "max_tokens 6 there, 4 now"), (dict(problems=problems[:-1]), "problems"),
                     (dict(routers={"CITER": str(tmp_path)}), "router 'CITER' from")):  # not the same evaluation
        args = {"problems": problems, "routers": {"CITER": router_path}, "max_tokens": 6, **kw}
        with pytest.raises(ValueError, match=f"holds an evaluation with other settings .*{what}"):
            DE.evaluate_data(engine, task, args["problems"], args["routers"], out, max_tokens=args["max_tokens"])
    monkeypatch.undo()
    timings = DE.time_methods(engine, task, problems, {"slm": dict(policy="slm"), "CITER": dict(
        policy="router", threshold=0.5, router_path=router_path)}, batch_sizes=(1, 4), repeats=1, max_tokens=6)
    assert all(v > 0 for t in timings.values() for v in t.values())
    DE.write_data_eval(res, out, "toy", {"slm": timings["slm"]})
    for f in ("eval.json", "pass_vs_llm_share.png", "pass_vs_llm_share_0_30.png", "pass_vs_ms_per_token.png"):
        assert os.path.isfile(os.path.join(out, f))
    assert "CITER" in DE.data_table(res, timings)


def test_knobs_are_kept_and_extended_when_routers_are_added(engine, router_path, tmp_path, monkeypatch):
    """A resumed evaluation with a router added (a Co-LLM head trained later) computes that
    router's knobs only; new target shares recompute all of them."""
    task = JsonlTask(eval_data=_toy(tmp_path), tokenizer=engine.tokenizer, checker="exact", extract="last-number")
    problems, path = task.test_problems(), str(tmp_path / "knobs.json")
    first = DE._knobs(engine, task, problems, {"CITER": router_path}, (0.1, 0.3), 6, path)
    both = DE._knobs(engine, task, problems, {"CITER": router_path, "again": router_path}, (0.1, 0.3), 6, path)
    assert both["CITER"] == first["CITER"] == both["again"] and both["confidence"] == first["confidence"]
    real_generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda *a, **k: pytest.fail("recomputed kept knobs"))
    assert DE._knobs(engine, task, problems, {"again": router_path}, (0.1, 0.3), 6, path)["again"] == both["again"]
    monkeypatch.setattr(engine, "generate", real_generate)
    other = DE._knobs(engine, task, problems, {"CITER": router_path}, (0.2,), 6, path)
    assert len(other["CITER"]) == len(other["confidence"]) == 1 and "again" not in other
