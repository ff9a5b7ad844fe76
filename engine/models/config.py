"""ModelConfig: the one config our decoder reads, built from a Hugging Face config.json.

Qwen2/Qwen2.5, Qwen3 and Llama (3.x) share one decoder shape; the differences are
flags here (attention biases, q/k norms, rope scaling, explicit head_dim).
"""
import json
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from transformers import AutoConfig, PretrainedConfig

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
FAMILIES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}  # model_type ->
REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    rope_params: Tuple[Tuple[str, float], ...]  # extra rope parameters (factor, ...)
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: biases on q/k/v; Llama/Qwen3: attention_bias
    o_bias: bool  # Llama's attention_bias also covers o_proj
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before rope
    eos_token_ids: Tuple[int, ...]
    bos_token_id: Optional[int]

    def weight_bytes(self, dtype: torch.dtype) -> int:
        """About what the weights take (layers, embedding, an untied lm_head) in this dtype."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        layer = h * q * 2 + 2 * h * kv + 3 * h * self.intermediate_size
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return (self.num_layers * layer + emb) * torch.empty((), dtype=dtype).element_size()

    def router_shape(self) -> dict:
        """What a shipped router records of its SLM (checked by load_router)."""
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "vocab_size": self.vocab_size}

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V for one token across all layers, in a cache of this dtype."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


def load_model_config(path: str, checkpoint=None) -> ModelConfig:
    """Read config.json from a Hugging Face folder (or the metadata of a GGUF checkpoint, see
    gguf.py; pass the checkpoint already read, if any); clear errors for what we cannot serve."""
    from .gguf import gguf_file, read_gguf  # gguf.py builds on ModelConfig: imported here, not at the top

    if checkpoint is not None:
        return checkpoint.config
    if gguf_file(path) is not None:
        return read_gguf(path).config
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path!r}")
    fn = os.path.join(path, "config.json")
    if not os.path.isfile(fn):
        raise FileNotFoundError(f"no config.json in model folder {path!r}")
    try:
        with open(fn) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{fn} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{fn} must hold a JSON object")
    archs = raw.get("architectures") or []
    if not archs and raw.get("model_type") in FAMILIES:
        raise ValueError(f"{fn} has no 'architectures' list (e.g. [\"{FAMILIES[raw['model_type']]}\"]); "
                         f"citer supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"unsupported architecture {archs or raw.get('model_type')!r} in {path}; "
                         f"citer supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    quant = raw.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ValueError(f"{fn} has a quantization_config ({method!r}): citer loads float checkpoints "
                         "(float32/float16/bfloat16 safetensors, or GGUF files); use the unquantized model "
                         "(Engine(quantization='int8') quantizes it on load)")
    missing = [k for k in REQUIRED_FIELDS if k not in raw]  # transformers would fill in its class defaults
    if missing:
        raise ValueError(f"{fn} lacks {', '.join(repr(k) for k in missing)}: the model's shape must be given")
    return from_hf_config(AutoConfig.from_pretrained(path), path)


def _eos_ids(value) -> Tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def from_hf_config(hf: PretrainedConfig, where: str = "<config>") -> ModelConfig:
    archs = list(getattr(hf, "architectures", None) or [])
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture {archs or hf.model_type!r} in {where}; "
            f"citer supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if getattr(hf, "hidden_act", "silu") not in ("silu", "swish"):  # transformers' "swish" is SiLU
        raise ValueError(f"unsupported hidden_act {hf.hidden_act!r} in {where}; citer supports 'silu'")
    if getattr(hf, "use_sliding_window", False):  # (transformers 4.5x and 5 disagree on which layers slide)
        raise ValueError(f"sliding-window attention (use_sliding_window=True) in {where} is not supported")

    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    rope_theta = float(rope.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0)
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {rope_type!r} in {where}; citer supports {SUPPORTED_ROPE_TYPES}"
        )
    rope_params = tuple(sorted((k, float(v)) for k, v in rope.items() if isinstance(v, (int, float))))

    num_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    is_qwen2 = arch == "Qwen2ForCausalLM"
    attention_bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        architecture=arch,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.rms_norm_eps),
        rope_theta=rope_theta,
        rope_type=rope_type,
        rope_params=rope_params,
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=is_qwen2 or attention_bias,
        o_bias=(not is_qwen2) and attention_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        eos_token_ids=_eos_ids(getattr(hf, "eos_token_id", None)),
        bos_token_id=getattr(hf, "bos_token_id", None),
    )
