"""Writing a transformers model as a GGUF file, as llama.cpp's convert_hf_to_gguf.py does, for
the llama.cpp comparisons (benchmarks/cpu_vs_llamacpp.py) and the GGUF tests: 2-D weights in
F32, F16 or a gguf.quants block type, llama's q/k rows permuted for its interleaved rope,
llama3 rope scaling as rope_freqs, no output.weight when the embeddings are tied, and the
tokenizer's metadata (a BPE tokenizer; ids past it named [PAD<id>]).
"""
import json
import math

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name):
    base, suffix = hf_name.rsplit(".", 1)
    if base in _GLOBAL:
        return f"{_GLOBAL[base]}.{suffix}"
    _, _, i, rest = base.split(".", 3)
    return f"blk.{i}.{_LAYER[rest]}.{suffix}"


def _permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py, LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(rope, theta, head_dim):  # llama.cpp, LlamaModel.generate_extra_tensors
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in (1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))).tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _pre_type(spec: dict) -> str:
    """tokenizer.ggml.pre: how llama.cpp and transformers split text before BPE. "qwen2" when the
    tokenizer (spec: its tokenizer.json) splits with Qwen2's regex (Qwen2, Qwen2.5, Qwen3, and
    citer's task tokenizers), else "default" (GPT-2's byte-level split)."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") or [pre]
    regexes = {(p.get("pattern") or {}).get("Regex") for p in parts if p.get("type") == "Split"}
    return "qwen2" if PRETOKENIZE_REGEX in regexes else "default"


def _add_tokenizer(w, tok, n_vocab):
    """The tokenizer metadata llama.cpp's convert_hf_to_gguf.py writes for a BPE tokenizer: added
    tokens are CONTROL when special and USER_DEFINED otherwise, so that readers match them whole
    in text; ids past the tokenizer are UNUSED and named [PAD<id>]."""
    inv = {i: t for t, i in tok.get_vocab().items()}
    added = {i: a.special for i, a in tok.added_tokens_decoder.items()}
    special = set(tok.all_special_ids)
    spec = json.loads(tok.backend_tokenizer.to_str())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_type(spec))
    w.add_token_list([inv.get(i, f"[PAD{i}]") for i in range(n_vocab)])
    T = gguf.TokenType
    w.add_token_types([T.CONTROL if i in special or added.get(i) else T.USER_DEFINED if i in added
                       else T.NORMAL if i in inv else T.UNUSED for i in range(n_vocab)])
    merges = spec["model"].get("merges") or []
    if merges:
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    else:  # no merges at all: transformers then derives them from scores
        w.add_token_scores([0.0] * n_vocab)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def write_gguf(path, model, arch, ftype=Q.F32, tokenizer=None, arch_name=None, qtypes=None):
    """A transformers model written as llama.cpp's convert_hf_to_gguf.py writes it: 2-D weights in
    ftype (or qtypes[gguf name]), 1-D tensors F32, llama's q/k rows permuted, llama3 rope scaling as
    rope_freqs, no output.weight when the embeddings are tied."""
    c = model.config
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    theta = rope.get("rope_theta") or c.rope_theta
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch_name or arch)
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if tokenizer is not None:
        _add_tokenizer(w, tokenizer, c.vocab_size)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_freqs(rope, theta, head_dim))
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = t.float().numpy()
        if arch == "llama" and ".q_proj." in name:
            data = _permute(data, c.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            data = _permute(data, c.num_key_value_heads)
        gname = gguf_name(name)
        qtype = (qtypes or {}).get(gname, ftype if data.ndim == 2 else Q.F32)
        if qtype == Q.F32:
            w.add_tensor(gname, np.ascontiguousarray(data))
        elif qtype == Q.F16:
            w.add_tensor(gname, data.astype(np.float16))
        elif qtype == Q.Q8_1:  # no quantizer in the gguf package: raw bytes of the right size
            w.add_tensor(gname, np.zeros((data.shape[0], data.shape[1] // 32 * 40), np.uint8), raw_dtype=qtype)
        else:
            w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
