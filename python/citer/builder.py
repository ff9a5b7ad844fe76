"""Building an engine: what Engine(...) does with its EngineArgs, in order.

Model folders and their configs, tokenizers (one shared vocabulary), sizes, ops,
weights, the router, the KV pool, EOS ids, then the EngineConfig (filled once, from the
arguments and what they resolve to), the page table, both model runners (each builds
its own CUDA graphs when the config says so) and the EngineCore that owns them all.
Every check of an argument happens here, before the step loop exists.
"""
import json
import os
from typing import List, Optional

import torch

from citer.engine.args import EngineArgs
from citer.engine.config import EngineConfig
from citer.engine.core import EngineCore
from citer.engine.model_runner import ModelRunner
from citer.engine.models.quantize import quantize_int8_
from citer.engine.models.tp import check_shardable
from citer.engine.profiler import PhaseTimer
from citer.engine.threads import ThreadTuner
from citer.engine.tp_group import TPGroup, TPSpec
from citer.kernels.flash_attention import check_flash_attn
from citer.kernels.ops import get_ops, resolve_backend

from citer.engine.models import load_model, load_model_config
from citer.engine.models.gguf import gguf_file, read_gguf
from citer.engine.models.loader import resolve_dtype
from citer.engine.models.router import FoldedRouter, load_router
from .pair_tokenizer import check_same_tokenizer, load_tokenizer, vocab_limit

DEFAULT_CPU_KV_MEMORY = 1 << 30  # 1 GiB for both models' caches
DEFAULT_GPU_KV_FRACTION = 0.85  # of the memory left after loading the weights
DEFAULT_MAX_MODEL_LEN = 4096  # when the models allow more


def build_core(args: EngineArgs) -> EngineCore:
    """EngineArgs (checked when made) -> the EngineCore that runs them."""
    slm, llm, router = args.slm, args.llm, args.router
    if slm is None and llm is None:
        raise ValueError("Engine needs at least one model folder (slm= or llm=)")
    block_size, max_model_len, max_num_seqs = args.block_size, args.max_model_len, args.max_num_seqs
    paths = {"slm": slm, "llm": llm}
    ggufs = {name: read_gguf(p) for name, p in paths.items() if p is not None and gguf_file(p) is not None}  # once
    cfgs = {name: load_model_config(p, ggufs.get(name)) for name, p in paths.items() if p is not None}
    slm_tok = load_tokenizer(slm, ggufs.get("slm")) if slm is not None else None
    llm_tok = load_tokenizer(llm, ggufs.get("llm")) if llm is not None else None
    check_same_tokenizer(slm_tok, llm_tok, slm, llm)
    tokenizer = slm_tok if slm_tok is not None else llm_tok
    limit = vocab_limit(cfgs.get("slm"), cfgs.get("llm"), tokenizer, slm, llm)
    model_max = min(c.max_position_embeddings for c in cfgs.values())
    if max_model_len is None:
        max_model_len = min(model_max, DEFAULT_MAX_MODEL_LEN)
    elif max_model_len > model_max:
        raise ValueError(f"max_model_len {max_model_len} exceeds the models' max_position_embeddings {model_max}")
    torch_dtype = resolve_dtype(args.dtype)
    devices = {"slm": torch.device(args.slm_device or args.device), "llm": torch.device(args.llm_device or args.device)}
    ops = {name: get_ops(resolve_backend(devices[name], args.backend), args.attention) for name in cfgs}
    if args.attention == "flash-attn":
        for name in cfgs:
            check_flash_attn(devices[name], torch_dtype, block_size)
    tp = args.llm_tensor_parallel_size if "llm" in cfgs else 1
    if tp > 1:
        check_shardable(cfgs["llm"], tp)

    models = {name: load_model(paths[name], devices[name], torch_dtype, max_positions=max_model_len,
                               vocab_limit=limit, checkpoint=ggufs.pop(name, None))[0]
              for name in cfgs if not (name == "llm" and tp > 1)}
    if args.quantization == "int8":
        models = {name: quantize_int8_(m) for name, m in models.items()}
    folded = fold_router(router, cfgs["slm"], devices["slm"], ops["slm"].name) if router is not None else None
    num_blocks = args.num_blocks
    if num_blocks is None:
        per_block = sum(c.kv_bytes_per_token(torch_dtype) for c in cfgs.values()) * block_size
        if args.kv_cache_memory is not None:
            budget = int(args.kv_cache_memory)
        else:
            budget = min(default_kv_memory(devices[n]) for n in cfgs)
            if tp > 1 and devices["llm"].type == "cuda":  # rank 0's slice is not loaded yet
                budget -= cfgs["llm"].weight_bytes(torch_dtype) // tp
        if budget < per_block:
            raise ValueError(f"kv_cache_memory of {budget} bytes holds no KV block: one block of {block_size} "
                             f"tokens takes {per_block} bytes for both models")
        num_blocks = min(budget // per_block, max_num_seqs * -(-max_model_len // block_size))
    if tp > 1:
        group = TPGroup(TPSpec(paths["llm"], tp, args.dtype, "cpu" if devices["llm"].type == "cpu" else "cuda",
                               max_model_len, limit, num_blocks, block_size, ops["llm"].name, args.tp_timeout,
                               args.quantization))
        models["llm"] = group.model
    graphs_on = {name: devices[name].type == "cuda" and ops[name].graph_safe and not args.enforce_eager
                 and not (name == "llm" and tp > 1) for name in cfgs}
    config = EngineConfig(
        device=str(devices["slm" if "slm" in cfgs else "llm"]), block_size=block_size, num_blocks=num_blocks,
        max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        cuda_graphs=any(graphs_on.values()), max_graph_query_len=args.max_graph_query_len, profile=args.profile,
        seed=args.seed, max_llm_wait=args.max_llm_wait, llm_batch_min=args.llm_batch_min,
        llm_prefill=args.llm_prefill,
    )
    from citer._C import BlockManager

    block_manager = BlockManager(num_blocks, block_size)
    cuda = [d for n, d in devices.items() if n in cfgs and d.type == "cuda"]
    timer = PhaseTimer(args.profile, (lambda: [torch.cuda.synchronize(d) for d in cuda]) if cuda else None)
    pools = {d: torch.cuda.graph_pool_handle() for d in {devices[n] for n in cfgs if graphs_on[n]}}  # one per device
    runners = {name: ModelRunner(name, model, ops[name], block_manager, config, devices[name], torch_dtype, timer,
                                 pools.get(devices[name]), graphs=graphs_on[name]) for name, model in models.items()}
    eos = eos_token_ids(cfgs, paths, tokenizer)
    tuner = None
    if all(devices[n].type == "cpu" for n in cfgs):
        if args.cpu_threads is not None:
            torch.set_num_threads(args.cpu_threads)
        else:
            tuner = ThreadTuner(torch.get_num_threads())
    return EngineCore(config, block_manager, runners.get("slm"), runners.get("llm"), folded, tokenizer, eos,
                      limit, timer, tuner)


def fold_router(path: str, slm_cfg, device: torch.device, backend: str) -> FoldedRouter:
    """A router folder, checked against the SLM it scores, folded on the SLM's device (the
    torch backend's CPU kernel keeps a float16-exact W1 in float16)."""
    folded = load_router(path, slm_cfg.hidden_size, slm_cfg.router_shape())
    return folded.to(device, exact_half_w1=backend == "torch")


def default_kv_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_GPU_KV_FRACTION)
    return DEFAULT_CPU_KV_MEMORY


def eos_token_ids(cfgs, paths, tokenizer) -> List[int]:
    """Every id that ends a generation: the configs', generation_config.json's, the tokenizer's."""
    eos = set()
    for name, cfg in cfgs.items():
        eos.update(cfg.eos_token_ids)
        eos.update(_generation_eos(paths[name]))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return sorted(eos)


def _generation_eos(path: str) -> List[int]:
    fn = os.path.join(path, "generation_config.json")
    if not os.path.isfile(fn):
        return []
    try:
        with open(fn) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is None:
            return []
        eos = [eos] if isinstance(eos, int) else list(eos)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
            raise TypeError(f"eos_token_id is {eos!r}")
        return eos
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"cannot read {fn!r} (its eos_token_id: an int or a list of ints): "
                         f"{type(e).__name__}: {e}") from None
