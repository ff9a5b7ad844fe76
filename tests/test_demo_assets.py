"""The shipped default: the trained pair and routers load (in citer and in transformers)
and solve held-out problems."""
import os

import pytest

from citer import Engine, SamplingParams
from citer.assets import DEMO_DIR, default_paths
from citer.research.tasks import get_task

N = 12


@pytest.fixture(scope="module")
def engine():
    return Engine(max_model_len=256, num_blocks=N * 16 + 16, max_num_seqs=N)


def test_default_paths_exist():
    slm, llm, router = default_paths()
    assert router is not None and os.path.isdir(os.path.join(DEMO_DIR, "router_s"))
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(DEMO_DIR) for f in fs)
    assert total < 40e6


def test_transformers_loads_the_shipped_folders():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    slm, llm, _ = default_paths()
    task = get_task("arith")
    p = task.test_problems(1)[0]
    for path in (slm, llm):
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert tok.decode(tok(p.prompt + p.solution).input_ids) == p.prompt + p.solution
        assert model.config.vocab_size >= len(tok)


def _accuracy(engine, policy):
    task = get_task("arith")
    problems = task.test_problems(N)
    outs = engine.generate([p.prompt for p in problems], SamplingParams(max_tokens=128, policy=policy))
    return sum(task.check(o.text, p) for o, p in zip(outs, problems)) / N, outs


def test_llm_and_router_solve_held_out_problems(engine):
    llm_acc, _ = _accuracy(engine, "llm")
    router_acc, outs = _accuracy(engine, "router")
    assert llm_acc >= 0.75
    assert router_acc >= llm_acc - 0.2
    share = sum(sum(o.from_llm) for o in outs) / sum(len(o.from_llm) for o in outs)
    assert 0.0 < share < 0.5
    assert all(s is not None and 0.0 <= s <= 1.0 for o in outs for s in o.router_scores)  # sigmoid may round to 1


@pytest.mark.parametrize("task_name", ["arith", "arith-free"])
def test_each_embedded_pair_ships_its_routers_and_routes(task_name):
    """Both embedded pairs (arith is the default): routers that match the SLM's hidden
    size, the head-signal CITER router as `router`, and a routed run that solves problems."""
    from citer.assets import shipped
    from citer.engine.models.router import load_router

    pair = shipped(task_name)
    assert pair["router"] and pair["router_s"] and pair["baselines"]
    assert load_router(pair["router"]).features == "hidden+head"
    engine = Engine(pair["slm"], pair["llm"], pair["router"], max_model_len=256, num_blocks=N * 16 + 16,
                    max_num_seqs=N)
    hidden = engine.slm_config.hidden_size
    for other in (pair["router_s"], os.path.join(pair["baselines"], "colm")):
        load_router(other, slm_hidden_size=hidden)  # raises on a hidden-size mismatch
    task = get_task(task_name)
    problems = task.test_problems(N)
    outs = engine.generate([p.prompt for p in problems], SamplingParams(max_tokens=128, policy="router"))
    assert sum(task.check(o.text, p) for o, p in zip(outs, problems)) >= N // 2
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
