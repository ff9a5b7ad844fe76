"""Inputs that used to confuse: each gets an error naming the field or file and what was
wrong, raised before any state changes (no block taken, no request left behind)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from citer import Engine, SamplingParams
from conftest import assert_all_free


@pytest.fixture(scope="module")
def engine(hf_models, router_path):
    return Engine(hf_models["qwen2"][0], hf_models["llama"][0], router_path, block_size=8, num_blocks=32,
                  max_model_len=64)


@pytest.mark.parametrize("kw,match", [
    (dict(seed=2**64), r"seed must be an int >= 0 and < 18446744073709551616"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(threshold="0.5"), "threshold must be a number, got '0.5'"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(top_p=float("nan")), "top_p must be a number"),
    (dict(max_tokens=True), "max_tokens must be an int"),
    (dict(stop_token_ids=5), "stop_token_ids must be a list of token ids, got 5"),
    (dict(stop_token_ids=[2, "3"]), "stop_token_ids must be non-negative ints"),
    (dict(stop=5), "stop must be a string or a list of strings"),
    (dict(ignore_eos="yes"), "ignore_eos must be True or False"),
    (dict(llm_fraction=2), r"llm_fraction must be in \[0.0, 1.0\]"),
])
def test_sampling_params_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_big_seeds_and_numpy_values_are_fine(engine):
    p = SamplingParams(max_tokens=2, temperature=np.float32(0.7), seed=2**64 - 1, stop_token_ids=[np.int64(3)],
                       policy="slm", ignore_eos=True)
    assert len(engine.generate([[5, 6]], p)[0].token_ids) == 2
    assert_all_free(engine)


@pytest.mark.parametrize("prompt,match", [
    (None, "prompt 0 is None"),
    (b"hello", "prompt 0 is bytes; decode it to a str first"),
    (np.array([1.0, 2.0]), r"prompt 0 is a ndarray of shape \(2,\) and dtype float64"),
    (torch.tensor([1.5, 2.5]), "prompt 0 is a Tensor of shape"),
    (torch.tensor([[5, 6]]), r"shape \(1, 2\)"),
    (12, "prompt 0 must be a string or a list of int token ids, got int"),
    ([5, True], "prompt 0 must be a string or a list of int token ids"),
])
def test_bad_prompts_are_named(engine, prompt, match):
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, SamplingParams(max_tokens=2))
    assert_all_free(engine)


def test_integer_arrays_and_tensors_are_prompts(engine):
    p = SamplingParams(max_tokens=3, policy="slm", ignore_eos=True)
    ref = engine.generate([[5, 6, 7]], p)[0].token_ids
    for prompt in (np.array([5, 6, 7], dtype=np.int32), torch.tensor([5, 6, 7]), (5, 6, 7)):
        assert engine.generate([prompt], p)[0].token_ids == ref
    assert engine.generate(torch.tensor([5, 6, 7]), p)[0].token_ids == ref  # one 1-D tensor: one prompt
    with pytest.raises(ValueError, match="prompts is None"):
        engine.generate(None, p)
    with pytest.raises(TypeError, match="prompts must be .* got int"):
        engine.generate(5, p)
    with pytest.raises(TypeError, match="params must be SamplingParams or a list .* got dict"):
        engine.generate([[5, 6, 7]], {"max_tokens": 3})
    assert_all_free(engine)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(path, drop=(), **set_):
    fn = os.path.join(path, "config.json")
    with open(fn) as f:
        cfg = json.load(f)
    for k in drop:
        cfg.pop(k, None)
    cfg.update(set_)
    with open(fn, "w") as f:
        json.dump(cfg, f)


def test_corrupt_weights_name_the_file(tmp_path, hf_models, router_path):
    slm = _copy(hf_models["qwen2"][0], tmp_path / "slm")
    with open(os.path.join(slm, "model.safetensors"), "wb") as f:
        f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match=r"cannot read weights file '.*model\.safetensors'"):
        Engine(slm, num_blocks=4)
    router = _copy(router_path, tmp_path / "router")
    with open(os.path.join(router, "router.safetensors"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read router weights '.*router\.safetensors'"):
        Engine(hf_models["qwen2"][0], hf_models["llama"][0], router, num_blocks=4)


@pytest.mark.parametrize("drop,match", [
    (("architectures",), "has no 'architectures' list"),
    (("hidden_size",), "lacks 'hidden_size'"),
    (("vocab_size", "num_attention_heads"), "lacks 'num_attention_heads', 'vocab_size'"),
])
def test_incomplete_configs_name_the_field(tmp_path, hf_models, drop, match):
    slm = _copy(hf_models["qwen2"][0], tmp_path / "slm")
    _edit_config(slm, drop=drop)
    with pytest.raises(ValueError, match=match):
        Engine(slm, num_blocks=4)


def test_broken_side_files_name_the_file(tmp_path, hf_models):
    slm = _copy(hf_models["qwen2"][0], tmp_path / "slm")
    with open(os.path.join(slm, "generation_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"cannot read '.*generation_config\.json'"):
        Engine(slm, num_blocks=4)
    os.remove(os.path.join(slm, "generation_config.json"))
    with open(os.path.join(slm, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}}, f)
    with pytest.raises(ValueError, match=r"cannot read the shard index '.*index\.json'.*weight_map"):
        Engine(slm, num_blocks=4)


def test_a_tokenizer_bigger_than_the_embedding_is_named(tmp_path, hf_models):
    """Text whose ids pass the embedding's rows once failed deep in F.embedding (IndexError)."""
    slm = _copy(hf_models["qwen2"][0], tmp_path / "slm")
    _edit_config(slm, vocab_size=64)  # the tokenizer has 99 tokens
    with pytest.raises(ValueError, match="tokenizer of .* has token ids up to 98, but the model's embedding has 64"):
        Engine(slm, num_blocks=4)


def test_a_tied_config_with_its_own_lm_head(tmp_path, hf_models):
    """tie_word_embeddings: true beside a stored lm_head.weight: transformers 5 uses the stored
    head, 4 ties it; citer once tied it silently. A different head is refused, naming the
    conflict; a stored copy of the embedding loads."""
    from safetensors.torch import load_file, save_file

    llm = _copy(hf_models["llama"][0], tmp_path / "llm")  # untied
    _edit_config(llm, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="ties the lm_head .* holds its own lm_head.weight"):
        Engine(llm, num_blocks=4)
    fn = os.path.join(llm, "model.safetensors")
    state = load_file(fn)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, fn)
    out = Engine(llm, num_blocks=16, max_model_len=32).generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0]
    assert len(out.token_ids) == 2


@pytest.mark.parametrize("value,match", [(0, "kv_cache_memory must be a positive number of bytes, got 0"),
                                         (-5, "kv_cache_memory must be a positive"),
                                         (100, "kv_cache_memory of 100 bytes holds no KV block")])
def test_kv_cache_memory_is_checked(hf_models, value, match):
    with pytest.raises(ValueError, match=match):
        Engine(hf_models["qwen2"][0], kv_cache_memory=value)
    assert Engine(hf_models["qwen2"][0], kv_cache_memory=1e6, max_model_len=64).config.num_blocks >= 1
    with pytest.raises(ValueError, match="kv_cache_memory must be a positive number of bytes, got inf"):
        Engine(hf_models["qwen2"][0], kv_cache_memory=float("inf"))
    with pytest.raises(ValueError, match="give num_blocks .* or kv_cache_memory .* not both"):
        Engine(hf_models["qwen2"][0], kv_cache_memory=4096, num_blocks=1000)
    with pytest.raises(ValueError, match="seed must be an int >= 0, got -5"):
        Engine(hf_models["qwen2"][0], seed=-5)
