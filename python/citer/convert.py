"""`citer convert`: a GGUF checkpoint written once as a Hugging Face folder.

The folder holds config.json (architectures / model_type from the GGUF's architecture),
model.safetensors (the dequantized weights in the dtype asked for; above max_shard_bytes,
model-0000X-of-0000N.safetensors shards with model.safetensors.index.json), the tokenizer
(tokenizer.json, tokenizer_config.json with the chat template) and generation_config.json with
the EOS ids. citer and transformers both load it (AutoModelForCausalLM.from_pretrained), and
citer's logits from it equal those from the GGUF (float32).

Dequantized values are float32 products of fp16 scales and small integers: bfloat16 (or float16)
output rounds most of them, so float32 is the default; a float32 folder of a quantized file is
about 4x (Q8_0) to 8x (Q4_K) the GGUF's size.
"""
import json
import os
import time
from typing import Dict, List

import torch
from safetensors.torch import save_file

from citer.engine.models.gguf import hf_config, hf_name, read_gguf
from citer.engine.models.loader import resolve_dtype
from .pair_tokenizer import gguf_tokenizer, save_tokenizer

DEFAULT_MAX_SHARD_BYTES = 4 << 30


def convert_gguf(src: str, out: str, dtype="float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Dict:
    """Write the GGUF file `src` as an HF folder `out` (new or empty). -> a summary: files,
    weight bytes, seconds."""
    t0 = time.perf_counter()
    torch_dtype = resolve_dtype(dtype)
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"output folder {out!r} is not empty; convert writes into a new or empty folder")
    ckpt = read_gguf(src)  # checks the architecture and every tensor's type before anything is written
    elem = torch.empty((), dtype=torch_dtype).element_size()
    sizes = {t.name: elem * _numel(t.shape) for t in ckpt.tensors.values() if hf_name(t.name) is not None}
    shards = _plan(sizes, max_shard_bytes)
    os.makedirs(out, exist_ok=True)

    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.for_model(**hf_config(ckpt))
    # recorded as the checkpoint's dtype: `dtype` since transformers 5, `torch_dtype` before
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", torch_dtype)
    config.save_pretrained(out)
    cfg = ckpt.config
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=list(cfg.eos_token_ids) or None,
                     pad_token_id=ckpt.metadata.get("tokenizer.ggml.padding_token_id")).save_pretrained(out)
    tok = gguf_tokenizer(ckpt.path)
    if tok is not None:
        save_tokenizer(tok, out)  # loadable by transformers 4 too

    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))] \
        if len(shards) > 1 else ["model.safetensors"]
    weight_map, tensors = {}, ckpt.hf_tensors()
    for shard, fname in zip(shards, names):
        part = {}
        for _ in shard:
            name, tensor = next(tensors)
            part[name] = tensor.to(torch_dtype).contiguous()
            weight_map[name] = fname
        save_file(part, os.path.join(out, fname), metadata={"format": "pt"})
        del part
    if len(shards) > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f, indent=2)
    return {"files": sorted(os.listdir(out)), "weight_bytes": sum(sizes.values()), "shards": len(shards),
            "seconds": time.perf_counter() - t0}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _plan(sizes: Dict[str, int], max_bytes: int) -> List[List[str]]:
    """Tensors in file order, cut into shards of at most max_bytes (a bigger tensor alone)."""
    shards: List[List[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards
