"""Our decoder vs transformers: same logits in float32 on the paged KV interface."""
import json
import os

import pytest
import torch

from citer.kernels.ops import get_ops
from citer.engine.models import load_model
from citer.engine.models.attention import AttentionMetadata
from conftest import MODEL_CONFIGS, build_hf_model, random_prompts

OPS = get_ops("torch")
BLOCK = 8


def paged_forward(model, cfg, prompts, cached_lens, num_blocks=64, seed=0):
    """Prefill prompts[b][:cached_lens[b]], then run the rest of every prompt as one ragged
    batch; both passes use permuted block tables. -> logits of every token of the second pass."""
    g = torch.Generator().manual_seed(seed)
    kv = [(torch.zeros(num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim),
           torch.zeros(num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim)) for _ in range(cfg.num_layers)]
    perm = torch.randperm(num_blocks, generator=g)
    max_blocks = max(-(-len(p) // BLOCK) for p in prompts)
    tables = perm[: len(prompts) * max_blocks].view(len(prompts), max_blocks).int()

    def run(starts, ends):
        ids = torch.cat([torch.tensor(p[a:b], dtype=torch.long) for p, a, b in zip(prompts, starts, ends)])
        pos = torch.cat([torch.arange(a, b) for a, b in zip(starts, ends)])
        seq_of = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(zip(starts, ends))])
        slots = tables[seq_of, pos // BLOCK].long() * BLOCK + pos % BLOCK
        q_lens = torch.tensor([b - a for a, b in zip(starts, ends)])
        qsl = torch.zeros(len(prompts) + 1, dtype=torch.int32)
        qsl[1:] = q_lens.cumsum(0)
        meta = AttentionMetadata(slots, tables, torch.tensor(ends, dtype=torch.int32), qsl,
                                 int(q_lens.max()), max(ends))
        return model.logits(OPS, model(OPS, ids, pos, kv, meta))

    if any(cached_lens):
        run([0] * len(prompts), list(cached_lens))
    return run(list(cached_lens), [len(p) for p in prompts])


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_logits_match_transformers_ragged_paged(hf_models, name):
    path, hf = hf_models[name]
    model, cfg = load_model(path, max_positions=512)
    prompts = random_prompts(3, 5, 45, seed=1)  # up to 6 blocks of 8
    cached = [0, 3, len(prompts[2]) - 1]  # fresh prefill, a catch-up, a decode step
    ours = paged_forward(model, cfg, prompts, cached)
    refs = []
    with torch.no_grad():
        for p, c in zip(prompts, cached):
            refs.append(hf(torch.tensor([p])).logits[0, c:])
    ref = torch.cat(refs)
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 1e-4 * scale


def test_sharded_checkpoint_matches_single(tmp_path, hf_models):
    path, hf = hf_models["llama"]
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert os.path.isfile(sharded / "model.safetensors.index.json")
    a, _ = load_model(path)
    b, _ = load_model(str(sharded))
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    # the parameter count (read from the files' headers) is transformers' own, single or sharded
    from citer.engine.models.loader import num_parameters

    assert num_parameters(path) == num_parameters(str(sharded)) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_transformers(tmp_path, dtype):
    conf = dict(MODEL_CONFIGS["qwen2"])
    arch = conf.pop("arch")
    hf = build_hf_model(str(tmp_path), arch, dtype=dtype, **conf)
    model, cfg = load_model(str(tmp_path), dtype={torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype])
    assert model.embed_tokens.weight.dtype == dtype
    prompts = random_prompts(1, 20, 20, seed=2)
    ours = paged_forward(model, cfg, prompts, [0])
    with torch.no_grad():
        ref = hf(torch.tensor(prompts)).logits[0].float()
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (ours - ref).abs().max() <= tol * ref.abs().max()


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("edit,refused", [
    ({"hidden_act": "swish"}, None),  # transformers runs "swish" as SiLU
    ({"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, "sliding-window attention"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config \\('fp8'\\)"),
])
def test_config_fields_read_as_transformers_reads_them(tmp_path, hf_models, edit, refused):
    import shutil

    from transformers import AutoModelForCausalLM

    from citer import Engine, SamplingParams
    from conftest import hf_greedy

    path = str(tmp_path / "m")
    shutil.copytree(hf_models["qwen2"][0], path)  # 2 layers
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(edit)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if refused:
        with pytest.raises(ValueError, match=refused):
            load_model(path)
        return
    prompt = random_prompts(1, 20, 20, seed=2)[0]  # longer than the window
    ours = Engine(path, num_blocks=16, max_model_len=64).generate([prompt], SamplingParams(
        max_tokens=6, policy="slm", ignore_eos=True))[0].token_ids
    assert ours == hf_greedy(AutoModelForCausalLM.from_pretrained(path).float().eval(), prompt, 6)


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture.*Qwen2ForCausalLM.*LlamaForCausalLM"):
        load_model(str(tmp_path))


def test_missing_weights_and_bad_shapes(tmp_path, hf_models):
    from safetensors.torch import load_file, save_file

    path, _ = hf_models["qwen2"]
    state = load_file(os.path.join(path, "model.safetensors"))
    for f in ("config.json",):
        with open(os.path.join(path, f)) as src, open(tmp_path / f, "w") as dst:
            dst.write(src.read())
    dropped = {k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}
    save_file(dropped, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing weights.*layers.1.mlp.gate_up_proj"):
        load_model(str(tmp_path))
    bad = dict(state)
    bad["model.norm.weight"] = torch.ones(3)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        load_model(str(tmp_path))
    save_file(state, str(tmp_path / "model.safetensors"))
    save_file({"model.norm.weight": state["model.norm.weight"]}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight' appears twice"):  # unindexed shards that overlap
        load_model(str(tmp_path))
    os.remove(tmp_path / "extra.safetensors")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(str(tmp_path))


def test_unsupported_rope_type(tmp_path, hf_models):
    path, _ = hf_models["llama"]
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["rope_scaling"] = cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
    os.makedirs(tmp_path / "m")
    with open(tmp_path / "m" / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="rope type"):
        load_model(str(tmp_path / "m"))
