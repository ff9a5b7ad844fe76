"""Engine core: parity with transformers' generate, sampling, stops, bad input, no leaked blocks."""
import os
import shutil

import pytest
import torch

from citer import Engine, SamplingParams
from conftest import assert_all_free, MODEL_CONFIGS, build_hf_model, hf_greedy, random_prompts

BS = 8




@pytest.fixture(scope="module")
def engine(hf_models):
    return Engine(hf_models["qwen2"][0], hf_models["llama"][0], block_size=BS, num_blocks=96, max_model_len=256)


@pytest.mark.parametrize("policy,model", [("slm", "qwen2"), ("llm", "llama")])
def test_greedy_matches_transformers_ragged_batch(engine, hf_models, policy, model):
    prompts = random_prompts(4, 3, 40, seed=3)  # up to 5 blocks of prompt, ragged
    params = SamplingParams(max_tokens=20, policy=policy, ignore_eos=True)
    outs = engine.generate(prompts, params)
    hf = hf_models[model][1]
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 20)
        assert o.finish_reason == "length"
        assert o.from_llm == [policy == "llm"] * 20
        assert o.router_scores == [None] * 20
    assert_all_free(engine)


def test_qwen3_engine_matches_transformers(hf_models):
    path, hf = hf_models["qwen3"]
    eng = Engine(path, block_size=BS, num_blocks=32, max_model_len=128)
    prompts = random_prompts(2, 9, 30, seed=4)
    outs = eng.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf, p, 12)
    assert_all_free(eng)


def test_stats_count_each_position_once(engine):
    prompts = random_prompts(3, 5, 30, seed=5)
    for policy in ("slm", "llm"):
        for p, o in zip(prompts, engine.generate(prompts, SamplingParams(max_tokens=9, policy=policy, ignore_eos=True))):
            key, other = ("slm", "llm") if policy == "slm" else ("llm", "slm")
            assert o.stats[f"{key}_forward_tokens"] == len(p) + 9 - 1  # the last token is never fed back
            assert o.stats[f"{other}_forward_tokens"] == 0
            assert o.stats["llm_calls"] == (9 if policy == "llm" else 0)


def test_text_prompt_equals_token_prompt(engine):
    tok = engine.tokenizer
    text = "The cat sat on the mat, 12+30=42."
    params = SamplingParams(max_tokens=8, policy="slm", ignore_eos=True)
    a = engine.generate(text, params)[0]
    b = engine.generate([tok(text).input_ids], params)[0]
    assert a.token_ids == b.token_ids
    assert a.text == tok.decode(a.token_ids, skip_special_tokens=True)


def test_seeded_sampling_reproducible_and_batch_invariant(engine):
    prompts = random_prompts(3, 4, 20, seed=6)
    p = SamplingParams(max_tokens=15, temperature=1.0, seed=1234, policy="slm", ignore_eos=True)
    a = engine.generate(prompts, p)
    b = engine.generate(prompts[:1], p)
    assert a[0].token_ids == b[0].token_ids
    c = engine.generate(prompts[:1], SamplingParams(max_tokens=15, temperature=1.0, seed=99, policy="slm",
                                                    ignore_eos=True))
    assert c[0].token_ids != a[0].token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(engine):
    prompts = random_prompts(2, 4, 20, seed=7)
    greedy = engine.generate(prompts, SamplingParams(max_tokens=10, policy="slm", ignore_eos=True))
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        outs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=2.0, seed=5, policy="slm",
                                                       ignore_eos=True, **kw))
        assert [o.token_ids for o in outs] == [g.token_ids for g in greedy]


def test_sampling_distribution_follows_softmax(hf_models):
    """One-token samples from a fixed prompt match softmax(logits / T) frequencies."""
    path, hf = hf_models["qwen2"]
    eng = Engine(path, block_size=BS, num_blocks=64, max_model_len=64)
    prompt = [5, 6, 7]
    with torch.no_grad():
        probs = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1].float() / 0.7, -1)
    outs = eng.generate([prompt] * 400, [SamplingParams(max_tokens=1, temperature=0.7, seed=s, policy="slm",
                                                        ignore_eos=True) for s in range(400)])
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=probs.numel()).float()
    top = probs.topk(3).indices
    for t in top:  # binomial standard error at n=400 is <= 0.025
        assert abs(counts[t] / 400 - probs[t]) < 0.08


def test_stop_token_ids_and_eos(engine, hf_models):
    prompt = random_prompts(1, 10, 10, seed=8)[0]
    full = engine.generate([prompt], SamplingParams(max_tokens=20, policy="slm", ignore_eos=True))[0].token_ids
    stop_tok = full[5]
    first = full.index(stop_tok)
    o = engine.generate([prompt], SamplingParams(max_tokens=20, policy="slm", stop_token_ids=[stop_tok]))[0]
    assert o.token_ids == full[: first + 1] and o.finish_reason == "stop"
    # the model's EOS (id 2) stops generation unless ignore_eos
    eng = Engine(hf_models["qwen2"][0], block_size=BS, num_blocks=32, max_model_len=128)
    eng.core.eos_token_ids = {stop_tok}  # the one copy: Engine.eos_token_ids reads it
    o = eng.generate([prompt], SamplingParams(max_tokens=20))[0]
    assert o.token_ids == full[: first + 1] and o.finish_reason == "stop"


def test_stop_strings_cut_text(engine):
    tok = engine.tokenizer
    prompt = "abc"
    base = engine.generate(prompt, SamplingParams(max_tokens=24, policy="slm", ignore_eos=True))[0]
    text = base.text
    assert len(text) >= 6
    stop = text[3:5]
    o = engine.generate(prompt, SamplingParams(max_tokens=24, policy="slm", ignore_eos=True, stop=[stop, "\x00zz"]))[0]
    assert o.finish_reason == "stop"
    assert o.text == text[: text.index(stop)]
    assert stop not in o.text
    assert tok.decode(o.token_ids).startswith(o.text)


def test_max_model_len_caps_generation(hf_models):
    eng = Engine(hf_models["qwen2"][0], block_size=BS, num_blocks=16, max_model_len=24)
    o = eng.generate([list(range(3, 23))], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert len(o.token_ids) == 4 and o.finish_reason == "length"
    assert_all_free(eng)


def test_no_tensor_lands_on_the_default_device(engine):
    """Every tensor the engine makes names its device (the model's, or the CPU on purpose):
    with the default device set to "meta", a CPU engine still runs. On a GPU a tensor that
    forgot its device would land on the CPU beside CUDA ones; this finds that here."""
    prompts = random_prompts(3, 2, 12, seed=1)
    ref = engine.generate(prompts, SamplingParams(max_tokens=5, policy="random", llm_fraction=0.5, seed=2,
                                                  ignore_eos=True))
    with torch.device("meta"):
        for kw in (dict(policy="slm"), dict(policy="llm", temperature=0.7),
                   dict(policy="confidence", temperature=0.7, top_p=0.9),
                   dict(policy="random", llm_fraction=0.5, temperature=0.8, top_k=5)):
            engine.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True, **kw))
        outs = engine.generate(prompts, SamplingParams(max_tokens=5, policy="random", llm_fraction=0.5, seed=2,
                                                       ignore_eos=True))
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert_all_free(engine)


# ---- bad input: clear errors, nothing leaked ------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(seed=-1), "seed"), (dict(policy="oracle"), "policy"),
    (dict(llm_fraction=1.5), "llm_fraction"), (dict(stop=[""]), "stop"), (dict(stop_token_ids=[-3]), "stop_token_ids"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_invalid_sampling_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_bad_prompts_change_nothing(engine):
    good = [5, 6, 7]
    cases = [([good, []], "prompt 1 is empty"),
             ([good, list(range(3, 90)) * 3], "prompt 1 has 261 tokens; max_model_len is 256"),
             ([good, [5, 1000]], "outside the vocabulary"),
             ([good, ["a", "b"]], "string or a list of int")]
    for prompts, match in cases:
        with pytest.raises(ValueError, match=match):
            engine.generate(prompts, SamplingParams(max_tokens=4, policy="slm"))
        assert_all_free(engine)
    with pytest.raises(ValueError, match="needs a router"):
        engine.generate([good], SamplingParams(max_tokens=4, policy="router"))
    assert_all_free(engine)


def test_text_prompt_without_tokenizer(tmp_path, hf_models):
    path = tmp_path / "notok"
    conf = dict(MODEL_CONFIGS["qwen2"])
    build_hf_model(str(path), conf.pop("arch"), with_tokenizer=False, **conf)
    eng = Engine(str(path), block_size=BS, num_blocks=16, max_model_len=64)
    with pytest.raises(ValueError, match="no tokenizer"):
        eng.generate("hello", SamplingParams(max_tokens=2))
    o = eng.generate([[5, 6]], SamplingParams(max_tokens=2))[0]
    assert o.text is None and len(o.token_ids) == 2
    assert_all_free(eng)


def test_mismatched_vocab_or_tokenizer_refused(tmp_path, hf_models):
    conf = dict(MODEL_CONFIGS["llama"])
    arch = conf.pop("arch")
    other = tmp_path / "other_vocab"
    build_hf_model(str(other), arch, vocab_size=200, with_tokenizer=False, **conf)
    notok = tmp_path / "slm_notok"
    conf2 = dict(MODEL_CONFIGS["qwen2"])
    build_hf_model(str(notok), conf2.pop("arch"), with_tokenizer=False, **conf2)
    with pytest.raises(ValueError, match="different vocabularies"):
        Engine(str(notok), str(other), block_size=BS, num_blocks=8)
    # same vocab size, different tokenizer files
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    diff = tmp_path / "difftok"
    shutil.copytree(hf_models["llama"][0], diff)
    for f in os.listdir(diff):
        if f.startswith(("tokenizer", "special_tokens")):
            os.remove(diff / f)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(65 + i): 3 + i for i in range(26)}}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>").save_pretrained(diff)
    with pytest.raises(ValueError, match="different tokenizers"):
        Engine(hf_models["qwen2"][0], str(diff), block_size=BS, num_blocks=8)


def test_attention_choice_is_checked(hf_models):
    from citer.kernels.flash_attention import check_flash_attn

    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        Engine(hf_models["qwen2"][0], attention="flash", num_blocks=4)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Engine(hf_models["qwen2"][0], attention="flash-attn", num_blocks=4)
    cuda = torch.device("cuda")  # a device object only: the rules are checked before any use
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        check_flash_attn(cuda, torch.float32, 256)
    with pytest.raises(ValueError, match="multiple of 256"):
        check_flash_attn(cuda, torch.bfloat16, 16)
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="flash_attn package is not importable"):
            check_flash_attn(cuda, torch.bfloat16, 512)


def test_kv_pool_too_small(hf_models):
    # 6 blocks of 8 = 48 tokens: each request below needs 4 blocks, so they take turns
    eng = Engine(hf_models["qwen2"][0], block_size=BS, num_blocks=6, max_model_len=128)
    prompts = random_prompts(3, 20, 20, seed=9)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    outs = eng.generate(prompts, params)
    solo = [eng.generate([p], params)[0].token_ids for p in prompts]
    assert [o.token_ids for o in outs] == solo
    assert_all_free(eng)
    with pytest.raises(ValueError, match="KV cache too small.*needs 9 blocks"):
        eng.generate([prompts[0], list(range(3, 60))], params)
    assert_all_free(eng)
    # the engine still serves after the refusal
    assert eng.generate([prompts[0]], params)[0].token_ids == solo[0]


def test_step_api_and_abort(engine):
    prompts = random_prompts(3, 5, 25, seed=10)
    ids = [engine.add_request(p, SamplingParams(max_tokens=30, policy="slm", ignore_eos=True)) for p in prompts]
    finished = {}
    for _ in range(4):
        for ev in engine.step():
            assert ev.request_id in ids
    out = engine.abort(ids[1])
    assert out.finish_reason == "abort" and len(out.token_ids) == 4
    assert engine.abort("nope") is None
    while engine.has_unfinished_requests():
        for ev in engine.step():
            if ev.output is not None:
                finished[ev.request_id] = ev.output
    assert set(finished) == {ids[0], ids[2]}
    assert all(len(o.token_ids) == 30 for o in finished.values())
    assert_all_free(engine)


def test_duplicate_request_id_refused(engine):
    engine.add_request([5, 6], SamplingParams(max_tokens=2, policy="slm"), request_id="dup")
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add_request([5, 6], SamplingParams(max_tokens=2, policy="slm"), request_id="dup")
    engine.abort("dup")
    assert_all_free(engine)


def test_failure_mid_step_frees_blocks(engine, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(engine.core.slm, "forward", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.generate(random_prompts(2, 5, 10), SamplingParams(max_tokens=5, policy="slm"))
    monkeypatch.undo()
    assert_all_free(engine)
    assert len(engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, policy="slm"))[0].token_ids) >= 1
