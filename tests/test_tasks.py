"""The arithmetic task: generator, split, checker, tokenizer."""
import json
import os
import re

import numpy as np
import pytest

from citer.research.tasks import ArithTask, Difficulty, get_task
from citer.research.tasks.arith import verify_solution


def test_seeded_generator_is_deterministic():
    t = get_task("arith")
    a = t.train_problems(20, np.random.default_rng(3))
    b = t.train_problems(20, np.random.default_rng(3))
    c = t.train_problems(20, np.random.default_rng(4))
    assert a == b and a != c


def test_solutions_are_right_and_end_with_the_answer():
    t = get_task("arith")
    for p in t.train_problems(300, np.random.default_rng(0)):
        assert verify_solution(p.solution)
        assert p.solution.endswith(f"#### {p.answer}")
        assert t.check(p.solution, p)
        assert p.prompt.startswith("Q: ") and p.prompt.endswith(" A:")
    assert not verify_solution(" 2+2=5. #### 5")


def test_difficulty_knob():
    easy = ArithTask(Difficulty(min_steps=1, max_steps=1, max_start=9, max_operand=9))
    hard = ArithTask(Difficulty(min_steps=4, max_steps=4))
    rng = np.random.default_rng(0)
    n_eq = lambda ps: np.mean([len(re.findall("=", p.solution)) for p in ps])  # noqa: E731
    e, h = easy.train_problems(200, rng), hard.train_problems(200, rng)
    assert n_eq(e) < 2 <= 4 <= n_eq(h)
    assert max(p.answer for p in e) < max(p.answer for p in h)


def test_held_out_split_fixed_and_disjoint_from_training():
    t = get_task("arith")
    test = t.test_problems()
    assert len(test) == 1000 and len({p.prompt for p in test}) == 1000
    assert t.test_problems(10) == ArithTask().test_problems(10)
    train = t.train_problems(5000, np.random.default_rng(1))
    assert not {p.prompt for p in train} & {p.prompt for p in test}


@pytest.mark.parametrize("text,expected", [
    (" 2+3=5. #### 5", 5), ("#### 17 and more", 17), ("####-4", -4), (" 2+3=5.", None), ("#### x", None), ("", None),
])
def test_answer_extraction(text, expected):
    assert get_task("arith").extract_answer(text) == expected


def test_checker_right_wrong_malformed():
    t = get_task("arith")
    p = t.test_problems(1)[0]
    assert t.check(p.solution, p)
    assert not t.check(p.solution.replace(f"#### {p.answer}", f"#### {p.answer + 1}"), p)
    assert not t.check("no answer here", p)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("chess")


def test_tokenizer_round_trip_and_autotokenizer(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

    from citer.pair_tokenizer import PORTABLE, save_tokenizer
    from citer.research.tasks.bpe_tokenizer import train_tokenizer

    t = get_task("arith")
    tok = train_tokenizer(p.prompt + p.solution for p in t.train_problems(500, np.random.default_rng(0)))
    save_tokenizer(tok, tmp_path)
    with open(tmp_path / "tokenizer_config.json") as f:
        assert json.load(f).items() >= PORTABLE.items()  # loads the same under transformers 4 and 5
    Qwen2Config(vocab_size=len(tok)).save_pretrained(tmp_path)  # transformers 5's AutoTokenizer: a Qwen2Tokenizer
    auto, fast = AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)
    for p in t.test_problems(50):
        text = p.prompt + p.solution
        ids = tok(text).input_ids
        assert auto(text).input_ids == ids == fast(text).input_ids
        assert auto.decode(ids) == text
        assert ids[: len(tok(p.prompt).input_ids)] == tok(p.prompt).input_ids  # the prompt is a prefix
    assert tok.convert_ids_to_tokens(tok(" 3").input_ids) == ["\u0120", "3"]  # single-digit numbers


def test_int_seed_equals_generator_and_module_level_checker():
    from citer.research.tasks import extract_answer, is_correct

    t = get_task("arith")
    assert t.train_problems(10, 7) == t.train_problems(10, np.random.default_rng(7))
    p = t.test_problems(1)[0]
    assert extract_answer(p.solution) == p.answer and is_correct(p.solution, p.answer)
    assert not is_correct(p.solution, p.answer + 1) and not is_correct("#### ", p.answer)


def _shipped(name):
    from citer.assets import DEMO_DIR

    path = os.path.join(DEMO_DIR, name)
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pytest.skip("the demo pair is not shipped in this build")
    return path


def test_shipped_pair_configs_and_tokenizer():
    from transformers import AutoTokenizer

    from citer.pair_tokenizer import PORTABLE

    slm, llm = _shipped("slm"), _shipped("llm")
    cfgs = [json.load(open(os.path.join(p, "config.json"))) for p in (slm, llm)]
    gens = [json.load(open(os.path.join(p, "generation_config.json"))) for p in (slm, llm)]
    for c, g in zip(cfgs, gens):
        assert c["model_type"] == "qwen2" and c["tie_word_embeddings"] and c["dtype"] == "float16"
        assert c["eos_token_id"] == g["eos_token_id"] == 0 and c["bos_token_id"] == g["bos_token_id"] == 0
    assert cfgs[0]["vocab_size"] == cfgs[1]["vocab_size"] and cfgs[0]["hidden_size"] < cfgs[1]["hidden_size"]
    for p in (slm, llm):  # written by save_tokenizer: transformers 4 loads them too
        assert json.load(open(os.path.join(p, "tokenizer_config.json"))).items() >= PORTABLE.items()
    a, b = AutoTokenizer.from_pretrained(slm), AutoTokenizer.from_pretrained(llm)
    assert a.get_vocab() == b.get_vocab()
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id) == (0, 0, 0)
    text = get_task("arith").test_problems(1)[0].prompt
    assert a(text).input_ids[0] != 0  # bos is never prepended


def test_shipped_llm_solves_held_out_problems_in_transformers():
    """Batched, left-padded greedy generation with transformers on the fp16 weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _shipped("llm")
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).float().eval()
    task = get_task("arith")
    problems = task.test_problems(8)
    batch = tok([p.prompt for p in problems], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=64, do_sample=False)
    texts = tok.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    assert sum(task.check(t, p) for t, p in zip(texts, problems)) >= 7
    assert all(verify_solution(t) for t, p in zip(texts, problems) if task.check(t, p))


# ---- arith-free: interchangeable choices ------------------------------------------------
def test_arith_free_draws_arith_problems_with_free_solutions():
    from citer.research.tasks import ArithFreeTask
    from citer.research.tasks.arith_free import equations

    free, plain = get_task("arith-free"), get_task("arith")
    assert isinstance(free, ArithFreeTask)
    a = free.train_problems(300, 5)
    texts = {p.solution for p in a}
    assert any("Then " in t or "So " in t or "Now " in t for t in texts)
    assert any("The answer is" in t for t in texts)
    for p in a:
        assert verify_solution(p.solution) and free.check(p.solution, p)
        # the same numbers as arith would compute, whatever the order of operands
        assert all({"+": x + y, "-": x - y, "*": x * y}[op] == c for x, op, y, c in equations(p.solution))
    # some sums and products are written with their operands swapped
    swapped = sum(1 for p in a for x, op, y, c in equations(p.solution) if op == "*" and y != 2 and x > 9)
    assert swapped > 0
    assert free.test_problems(5) != plain.test_problems(5) and len(free.test_problems()) == 1000
    assert not {p.prompt for p in free.test_problems()} & {p.prompt for p in free.train_problems(500, 1)}


def test_arith_free_every_variant_checks():
    from citer.research.tasks.arith_free import ArithFreeTask, equations

    task = get_task("arith-free")
    for p in task.train_problems(20, 9):
        eqs = equations(p.solution)
        variants = list(ArithFreeTask.variants(eqs, p.answer))
        assert p.solution in variants and len(set(variants)) == len(variants) > 1
        for v in variants:
            assert task.check(v, p) and verify_solution(v)
    # and a wrong result is still caught, in any variant
    p = task.train_problems(1, 3)[0]
    bad = p.solution.replace(f"#### {p.answer}", f"#### {p.answer + 1}")
    assert not task.check(bad, p)
