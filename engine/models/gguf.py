"""GGUF checkpoints (llama.cpp's one-file format) as citer models.

A .gguf file, or a folder holding exactly one .gguf and no safetensors, stands where a Hugging
Face folder would: the config comes from the file's `<arch>.*` metadata (architectures qwen2,
qwen3, llama), EOS/BOS ids from `tokenizer.ggml.*`, and the weights are dequantized with
gguf.quants to float32, then cast to the dtype asked for. llama.cpp stores llama's q/k rows
permuted for its interleaved rope; they are permuted back here (qwen2/qwen3 use the NEOX rope,
which is transformers' rotate_half, and are stored as they are). A file without `output.weight`
ties the lm_head to the embeddings. Llama-3 rope scaling is stored as per-frequency divisors
(`rope_freqs.weight`); they are read back into the llama3 rope parameters they came from.

gguf.GGUFReader takes ~10 s to open a file with a 152K-token vocabulary (all of it the token and
merge string arrays), so one read serves the config, the weights, the tokenizer check and
`citer convert`: `read_gguf` keeps what it needs from the reader (metadata, tensor table,
memory-mapped tensor data) in a GGUFCheckpoint, which the loaders take instead of the path.
"""
import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from .config import ModelConfig, SUPPORTED_ROPE_TYPES

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BIG_ARRAY = 1024  # metadata arrays longer than this (vocabularies, merges) are not kept


def gguf_file(path: str) -> Optional[str]:
    """The GGUF file a model path names, or None when it is not a GGUF checkpoint: a *.gguf path,
    or a folder with exactly one *.gguf and no *.safetensors."""
    if str(path).lower().endswith(".gguf") and not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path!r}")
        return str(path)
    if not os.path.isdir(path):
        return None
    names = os.listdir(path)
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf") and os.path.isfile(os.path.join(path, n)))
    if not ggufs or any(n.endswith(".safetensors") for n in names):
        return None
    if len(ggufs) > 1:
        raise ValueError(f"model folder {path!r} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}); "
                         "name the one to load")
    return os.path.join(path, ggufs[0])


@dataclass
class GGUFTensor:
    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: Tuple[int, ...]  # torch order (GGUF lists ne fastest-first; this is reversed)
    data: np.ndarray  # memory-mapped, as stored


@dataclass
class GGUFCheckpoint:
    """What one read of a GGUF file yields: enough for the config, the weights and a conversion."""

    path: str
    architecture: str  # GGUF's name: qwen2 | qwen3 | llama
    metadata: Dict[str, Any]
    tensors: Dict[str, GGUFTensor]
    config: ModelConfig
    hf_rope: Optional[Dict[str, Any]]  # the HF rope_scaling dict (None: default rope)
    # (token, special) for each token the file marks CONTROL or UNKNOWN (special) or USER_DEFINED:
    # the tokens a tokenizer must match whole in text, as llama.cpp does (the vocabulary itself is
    # not kept)
    added_tokens: Tuple[Tuple[str, bool], ...] = ()

    @property
    def has_tokenizer(self) -> bool:
        return "tokenizer.ggml.model" in self.metadata

    def hf_tensors(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) for every weight, dequantized one at a time, in file order;
        llama's q/k rows put back in HF order."""
        for t in self.tensors.values():
            name = hf_name(t.name)
            if name is None:  # rope_freqs: read into the config
                continue
            yield name, self._tensor(t)

    def _tensor(self, t: GGUFTensor) -> torch.Tensor:
        from gguf.quants import dequantize

        arr = np.asarray(dequantize(t.data, t.qtype), dtype=np.float32).reshape(t.shape)
        if self.architecture == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            cfg = self.config
            heads = cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads
            # llama.cpp's permute (rows of each head interleaved in pairs for its rope), undone
            arr = arr.reshape(heads, -1, 2, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)
        if not (arr.flags.writeable and arr.flags.c_contiguous):  # F32/F16 data: a view of the mapped file
            arr = np.array(arr, dtype=np.float32, order="C")
        return torch.from_numpy(arr)


def hf_name(gguf_name: str) -> Optional[str]:
    """A GGUF tensor name -> its Hugging Face name (None for rope_freqs.weight); ValueError if unknown."""
    base, _, suffix = gguf_name.rpartition(".")
    if base == "rope_freqs":
        return None
    if base in _GLOBAL and suffix in ("weight", "bias"):
        return f"{_GLOBAL[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{suffix}"
    raise ValueError(f"unexpected tensor {gguf_name!r}")


def read_gguf(path: str) -> GGUFCheckpoint:
    """Read a GGUF file: metadata, tensor table, config; checks that citer can serve its
    architecture and read every tensor's type before any weight is read. The builder reads
    each file once and hands the checkpoint to the config, weight and tokenizer loaders."""
    return _read(gguf_file(path) or path)


def _read(fn: str) -> GGUFCheckpoint:
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF checkpoints needs the gguf package: pip install 'citer[gguf]'") from e
    try:
        reader = gguf.GGUFReader(fn)
    except Exception as e:
        raise ValueError(f"cannot read {fn!r} as a GGUF file: {e}") from e
    meta: Dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > _BIG_ARRAY:
            meta[key + ".count"] = len(field.data)
            continue
        meta[key] = field.contents()
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r} in {fn}; citer reads "
                         f"{', '.join(ARCHITECTURES)} ({', '.join(ARCHITECTURES.values())})")
    tensors = {}
    for t in reader.tensors:
        if not _can_dequantize(t.tensor_type):
            raise ValueError(f"tensor {t.name!r} in {fn} has quant type {t.tensor_type.name}, which citer cannot "
                             f"read; it reads {', '.join(readable_types())}")
        try:
            hf_name(t.name)
        except ValueError as e:
            raise ValueError(f"{e} in {fn} ({arch})") from None
        tensors[t.name] = GGUFTensor(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())),
                                     t.data)
    cfg, hf_rope = _config(meta, tensors, arch, fn)
    return GGUFCheckpoint(fn, arch, meta, tensors, cfg, hf_rope, _added_tokens(reader.fields))


def _added_tokens(fields) -> Tuple[Tuple[str, bool], ...]:
    """(token, special) for the CONTROL, UNKNOWN and USER_DEFINED tokens, decoding only those
    strings (a 152K-token vocabulary holds a few dozen)."""
    from gguf import TokenType

    types, tokens = fields.get("tokenizer.ggml.token_type"), fields.get("tokenizer.ggml.tokens")
    if types is None or tokens is None or not len(types.data):
        return ()
    kinds = np.concatenate([types.parts[i] for i in types.data])[:len(tokens.data)]
    # a token that is not UTF-8 cannot be matched in text anyway; it must not stop the weights loading
    special = (kinds == TokenType.CONTROL) | (kinds == TokenType.UNKNOWN)
    return tuple((bytes(tokens.parts[tokens.data[i]]).decode("utf-8", "replace"), bool(special[i]))
                 for i in np.nonzero(special | (kinds == TokenType.USER_DEFINED))[0])


@functools.lru_cache(maxsize=None)
def _can_dequantize(qtype) -> bool:
    """Does gguf.quants dequantize this type? (probed on one zero block)"""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    probe = {gguf.GGMLQuantizationType.F32: np.zeros(block, np.float32),
             gguf.GGMLQuantizationType.F16: np.zeros(block, np.float16)}.get(qtype, np.zeros((1, size), np.uint8))
    try:
        gguf.quants.dequantize(probe, qtype)
    except NotImplementedError:
        return False
    return True


def readable_types():
    import gguf

    return [q.name for q in gguf.GGMLQuantizationType if _can_dequantize(q)]


def _f32(v) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(v)))


def _config(meta, tensors, arch: str, fn: str) -> Tuple[ModelConfig, Optional[Dict[str, Any]]]:
    def get(key, default=None, required=False):
        v = meta.get(f"{arch}.{key}", default)
        if v is None and required:
            raise ValueError(f"GGUF file {fn} lacks {arch}.{key}: the model's shape must be given")
        return v

    def per_layer(key, default=None):  # some files give per-layer values; citer needs them equal
        v = get(key, default, required=default is None)
        if isinstance(v, list):
            if len(set(v)) != 1:
                raise ValueError(f"{arch}.{key} in {fn} differs between layers ({v}); citer does not support that")
            v = v[0]
        return int(v)

    if "token_embd.weight" not in tensors:
        raise ValueError(f"GGUF file {fn} has no token_embd.weight")
    vocab, hidden = tensors["token_embd.weight"].shape
    num_heads = per_layer("attention.head_count")
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // num_heads
    for key in ("attention.value_length", "rope.dimension_count"):
        if get(key) not in (None, head_dim):
            raise ValueError(f"{arch}.{key} = {get(key)} in {fn} differs from the head size {head_dim}; "
                             "citer does not support that (partial rotary or a separate value size)")
    theta = _f32(get("rope.freq_base", 10000.0))
    rope_type, rope_params, hf_rope = _rope(meta, tensors, arch, theta, int(head_dim), fn)
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if meta.get(k) is not None]
    has = lambda name: name in tensors  # noqa: E731
    qkv_bias = arch == "qwen2" or has("blk.0.attn_q.bias")
    cfg = ModelConfig(
        architecture=ARCHITECTURES[arch], vocab_size=int(vocab), hidden_size=int(per_layer("embedding_length")),
        intermediate_size=per_layer("feed_forward_length"), num_layers=int(get("block_count", required=True)),
        num_heads=num_heads, num_kv_heads=per_layer("attention.head_count_kv", num_heads), head_dim=int(head_dim),
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", required=True)), rope_theta=theta,
        rope_type=rope_type, rope_params=rope_params, max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings=not has("output.weight"), qkv_bias=qkv_bias, o_bias=has("blk.0.attn_output.bias"),
        mlp_bias=has("blk.0.ffn_gate.bias"), qk_norm=arch == "qwen3", eos_token_ids=tuple(dict.fromkeys(eos)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
    )
    if cfg.hidden_size != hidden:
        raise ValueError(f"{arch}.embedding_length = {cfg.hidden_size} in {fn}, but token_embd.weight has "
                         f"{hidden} columns")
    return cfg, hf_rope


def _rope(meta, tensors, arch: str, theta: float, head_dim: int, fn: str):
    """-> (rope_type, rope_params, HF rope_scaling dict or None)."""
    kind = meta.get(f"{arch}.rope.scaling.type") or "none"
    if kind == "linear":
        factor = _f32(meta[f"{arch}.rope.scaling.factor"])
        return "linear", (("factor", factor),), {"rope_type": "linear", "factor": factor}
    if kind != "none":
        raise ValueError(f"unsupported rope scaling {kind!r} in {fn}; citer supports {SUPPORTED_ROPE_TYPES}")
    if "rope_freqs.weight" not in tensors:
        return "default", (), None
    from gguf.quants import dequantize

    t = tensors["rope_freqs.weight"]
    params = llama3_from_freq_factors(np.asarray(dequantize(t.data, t.qtype), np.float64).ravel(), theta, head_dim)
    if params is None:
        return "default", (), None
    if params == "unknown":
        raise ValueError(f"rope_freqs.weight in {fn} is not a llama3 rope scaling citer can read back")
    return "llama3", tuple(sorted(params.items())), {"rope_type": "llama3", **params}


def llama3_from_freq_factors(factors: np.ndarray, theta: float, head_dim: int):
    """llama.cpp's rope_freqs (each rope frequency is divided by its factor) -> the llama3 rope
    parameters that produce them (factor, low/high_freq_factor, original_max_position_embeddings),
    None when every factor is 1, "unknown" when no llama3 scaling fits them."""
    if factors.shape != (head_dim // 2,) or not np.all(factors > 0):
        return "unknown"
    if np.all(factors == 1.0):
        return None
    factor = float(factors.max())
    x = 1.0 / (2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim))  # 1 / wavelength
    mid = ~np.isclose(factors, 1.0, rtol=1e-6, atol=0) & ~np.isclose(factors, factor, rtol=1e-6, atol=0)
    if mid.sum() < 2:  # the smooth band fixes both thresholds; without it they are not determined
        return "unknown"
    smooth = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)  # 0 at the low-frequency end, 1 at high
    slope, icpt = np.polyfit(x[mid], smooth, 1)
    x_low, x_high = -icpt / slope, (1.0 - icpt) / slope
    if not 0 < x_low < x_high:
        return "unknown"
    old_ctx = int(round(1.0 / x_low))
    params = {"factor": _f32(factor), "original_max_position_embeddings": old_ctx}
    for rounded in (True, False):
        low, high = old_ctx * x_low, old_ctx * x_high
        params.update(low_freq_factor=round(low, 4) if rounded else low, high_freq_factor=round(high, 4) if rounded
                      else high)
        if np.allclose(_llama3_factors(params, x), factors, rtol=1e-5, atol=0):
            return params
    return "unknown"


def _llama3_factors(p, x: np.ndarray) -> np.ndarray:
    """transformers' llama3 rope scaling, as factors the base frequencies are divided by."""
    old, low, high, factor = p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"], \
        p["factor"]
    smooth = (old * x - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(x > high / old, 1.0, np.where(x < low / old, factor, medium))


def hf_config(ckpt: GGUFCheckpoint) -> Dict[str, Any]:
    """The Hugging Face config (as keyword arguments of AutoConfig.for_model) of a GGUF checkpoint."""
    cfg = ckpt.config
    out: Dict[str, Any] = dict(
        model_type=ckpt.architecture, architectures=[cfg.architecture], vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        hidden_act="silu", rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, rope_scaling=ckpt.hf_rope,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=_one_or_list(cfg.eos_token_ids),
    )
    pad = ckpt.metadata.get("tokenizer.ggml.padding_token_id")
    if pad is not None:
        out["pad_token_id"] = pad
    if ckpt.architecture != "qwen2":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if ckpt.architecture == "qwen3":
        out.pop("mlp_bias")
    return out


def _one_or_list(ids):
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)
