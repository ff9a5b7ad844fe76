"""Load a Hugging Face checkpoint folder (single or sharded safetensors) or a GGUF file into DecoderLM."""
import json
import math
import os
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch
from safetensors import safe_open

from .config import ModelConfig, load_model_config
from .decoder import DecoderLM
from .gguf import gguf_file, read_gguf
from .rope import RotaryEmbedding
from .tp import Shard, check_shardable, local_config, shard_slices

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; choose one of {list(DTYPES)}")


def safetensors_files(path: str) -> list:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"cannot read the shard index {index!r} (a JSON object with a 'weight_map' of "
                             f"weight name -> file): {type(e).__name__}: {e}") from None
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in model folder {path!r}")
    return [os.path.join(path, f) for f in files]


def num_parameters(path: str) -> int:
    """The number of weights in a checkpoint folder's safetensors files (shapes only: nothing is read)."""
    n = 0
    for fn in safetensors_files(path):
        with safe_open(fn, framework="pt") as f:
            n += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return n


def _iter_tensors(files, slicer=None) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight; slicer(name) -> (dim, start, stop) reads only that slice
    (dim -1: skip the tensor; None: all of it)."""
    for fn in files:
        try:
            f = safe_open(fn, framework="pt")
        except Exception as e:  # safetensors' own errors name neither the file nor the cause plainly
            raise ValueError(f"cannot read weights file {fn!r} (not a valid safetensors file?): {e}") from e
        with f:
            for name in f.keys():
                sl = slicer(name) if slicer is not None else None
                if sl is None:
                    yield name, f.get_tensor(name)
                elif sl[0] >= 0:
                    part = f.get_slice(name)
                    yield name, part[sl[1]:sl[2]] if sl[0] == 0 else part[:, sl[1]:sl[2]]


def _sliced(tensors, slicer) -> Iterator[Tuple[str, torch.Tensor]]:
    """Slices of (name, tensor) pairs read whole (GGUF)."""
    for name, t in tensors:
        sl = slicer(name)
        if sl is None:
            yield name, t
        elif sl[0] >= 0:
            yield name, t[sl[1]:sl[2]] if sl[0] == 0 else t[:, sl[1]:sl[2]]


# HF name suffix -> (our parameter suffix, shard index within a fused parameter)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def _fused_offsets(cfg: ModelConfig, target: str):
    if target.endswith("qkv_proj"):
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [0, q, q + kv, q + 2 * kv]
    i = cfg.intermediate_size
    return [0, i, 2 * i]


def load_weights(model: DecoderLM, files) -> None:
    load_state(model, _iter_tensors(files))


def load_state(model: DecoderLM, tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Copy (HF name, tensor) pairs into the model's (fused) parameters; every one must be used
    once, with its shape, and every parameter filled."""
    cfg = model.cfg
    params: Dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    loaded, stored_head = set(), None
    for hf_name, tensor in tensors:
        name = hf_name
        if name.startswith("model."):
            name = name[len("model."):]
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            stored_head = tensor  # the embedding's copy, or a conflict (checked below)
            continue
        if "rotary_emb" in name:
            continue
        target, rows = name, None
        for hf, (ours, shard) in _FUSED.items():
            if f".{hf}." in name:
                target = name.replace(hf, ours)
                off = _fused_offsets(cfg, ours)
                rows = (off[shard], off[shard + 1])
                break
        if target not in params:
            raise ValueError(f"unexpected weight {hf_name!r} in checkpoint for {cfg.architecture}")
        dst = params[target] if rows is None else params[target][rows[0]:rows[1]]
        if dst.shape != tensor.shape:
            raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
        key = target if rows is None else f"{target}[{rows[0]}]"
        if key in loaded:  # two files holding it (unindexed shards): which one is meant is unknown
            raise ValueError(f"weight {hf_name!r} appears twice in the checkpoint")
        with torch.no_grad():
            dst.copy_(tensor)
        loaded.add(key)
    expected = set()
    for pname, p in params.items():
        if pname == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if pname.endswith(("qkv_proj.weight", "qkv_proj.bias", "gate_up_proj.weight", "gate_up_proj.bias")):
            for start in _fused_offsets(cfg, pname.rsplit(".", 1)[0])[:-1]:
                expected.add(f"{pname}[{start}]")
        else:
            expected.add(pname)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    emb = params.get("embed_tokens.weight")
    if (stored_head is not None and emb is not None and stored_head.shape == emb.shape
            and not torch.equal(stored_head.to(device=emb.device, dtype=emb.dtype), emb)):
        raise ValueError(
            "config.json ties the lm_head to the embeddings (tie_word_embeddings: true), but the checkpoint "
            "holds its own lm_head.weight, different from embed_tokens.weight; transformers 5 uses the stored "
            "head and transformers 4 ties it: set tie_word_embeddings to false to use it, or drop lm_head.weight")


def load_model(path: str, device="cpu", dtype="float32", max_positions: int = 4096, vocab_limit=None,
               checkpoint=None, shard: Optional[Shard] = None):
    """-> (DecoderLM in eval mode on device/dtype, ModelConfig). vocab_limit: the head
    chooses among the first vocab_limit token ids (None: all of the model's). path: an HF
    folder or a GGUF checkpoint (dequantized to dtype; checkpoint: the file already read).
    shard: load one tensor-parallel rank's slice (tp.py), reading only its slices of the
    safetensors files; the model's config is then the rank's local one."""
    dtype = resolve_dtype(dtype)
    gguf = checkpoint is not None or gguf_file(path) is not None
    cfg = (checkpoint or read_gguf(path)).config if gguf else load_model_config(path)
    slicer = None
    if shard is not None:
        check_shardable(cfg, shard.world)
        slicer = lambda name: shard_slices(name, cfg, shard)  # noqa: E731
    if gguf:
        tensors = (checkpoint or read_gguf(path)).hf_tensors()
        tensors = _sliced(tensors, slicer) if slicer else tensors
    else:
        tensors = _iter_tensors(safetensors_files(path), slicer)
    model_cfg = local_config(cfg, shard) if shard is not None else cfg
    device = torch.device(device)
    with torch.device("meta"):
        model = DecoderLM(model_cfg, 1, vocab_limit, shard)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(model_cfg, max_positions).to(device)
    load_state(model, tensors)
    return model.eval().requires_grad_(False), cfg
