"""Engine: the public entry point (load models, generate, stream, step-level API)."""
import itertools
import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from citer.engine.config import EngineConfig
from citer.engine.core import EngineCore
from citer.engine.cuda_graph import attach_graphs
from citer.engine.model_runner import ModelRunner
from citer.engine.sequence import Sequence as Seq
from citer.kernels.flash_attention import check_flash_attn
from citer.kernels.ops import get_ops, resolve_backend

from .models import load_model, load_model_config
from .models.loader import resolve_dtype
from .outputs import RequestOutput, TokenEvent
from .router import load_router
from .sampling_params import SamplingParams
from .tokenizer import check_same_tokenizer, load_tokenizer, vocab_limit

Prompt = Union[str, Sequence[int]]
DEFAULT_CPU_KV_MEMORY = 1 << 30  # 1 GiB for both models' caches
DEFAULT_GPU_KV_FRACTION = 0.85  # of the memory left after loading the weights


@dataclass
class Calibration:
    threshold: float
    llm_share: float  # share of generated tokens the LLM made at that threshold
    target: float


class Engine:
    """Token-level routed decoding between a small (SLM) and a large (LLM) model.

    Engine(slm, llm=None, router=None, *, device, dtype, block_size=16, num_blocks or
    kv_cache_memory, max_model_len, ...). Checkpoints are Hugging Face folders. With no
    model arguments it loads the embedded default pair and router (see citer.assets).
    On CUDA (Triton backend) the SLM decode step and LLM catch-ups of up to
    max_graph_query_len tokens replay CUDA graphs; enforce_eager=True turns them off.
    attention="flash-attn" uses flash-attn's paged attention (CUDA, fp16/bf16,
    block_size a multiple of 256) instead of the Triton kernel.
    """

    def __init__(self, slm: Optional[str] = None, llm: Optional[str] = None, router: Optional[str] = None, *,
                 device: str = "cpu", dtype: str = "float32", block_size: int = 16,
                 num_blocks: Optional[int] = None, kv_cache_memory: Optional[int] = None,
                 max_model_len: Optional[int] = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 8192, backend: Optional[str] = None,
                 attention: Optional[str] = None,
                 enforce_eager: bool = False, max_graph_query_len: int = 32, profile: bool = False,
                 seed: int = 0):
        if slm is None and llm is None and router is None:
            from .assets import default_paths

            slm, llm, router = default_paths()
        if slm is None and llm is None:
            raise ValueError("Engine needs at least one model folder (slm= or llm=)")
        if router is not None and (slm is None or llm is None):
            raise ValueError("a router needs both an SLM and an LLM")
        slm_cfg = load_model_config(slm) if slm is not None else None
        llm_cfg = load_model_config(llm) if llm is not None else None
        slm_tok = load_tokenizer(slm) if slm is not None else None
        llm_tok = load_tokenizer(llm) if llm is not None else None
        check_same_tokenizer(slm_tok, llm_tok, slm, llm)
        self.tokenizer = slm_tok if slm_tok is not None else llm_tok
        self.vocab_limit = vocab_limit(slm_cfg, llm_cfg, self.tokenizer, slm, llm)
        cfgs = [c for c in (slm_cfg, llm_cfg) if c is not None]
        model_max = min(c.max_position_embeddings for c in cfgs)
        if max_model_len is None:
            max_model_len = min(model_max, 4096)
        elif max_model_len > model_max:
            raise ValueError(f"max_model_len {max_model_len} exceeds the models' max_position_embeddings {model_max}")
        torch_device = torch.device(device)
        torch_dtype = resolve_dtype(dtype)
        self.backend = resolve_backend(torch_device, backend)
        ops = get_ops(self.backend, attention)  # raises on an unknown attention
        if attention == "flash-attn":
            check_flash_attn(torch_device, torch_dtype, block_size)

        models = {}
        for name, path in (("slm", slm), ("llm", llm)):
            if path is not None:
                models[name] = load_model(path, torch_device, torch_dtype, max_positions=max_model_len)
        router_obj = None
        if router is not None:
            router_obj = load_router(router, slm_cfg.hidden_size).to(torch_device)

        per_block = sum(ModelRunner.kv_bytes_per_block(c, block_size, torch_dtype) for c in cfgs)
        if num_blocks is None:
            budget = kv_cache_memory or self._default_kv_memory(torch_device)
            want = max_num_seqs * -(-max_model_len // block_size)
            num_blocks = max(1, min(budget // per_block, want))
        self.config = EngineConfig(
            device=str(torch_device), dtype=str(dtype), block_size=block_size, num_blocks=num_blocks,
            kv_cache_memory=kv_cache_memory, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, backend=self.backend, attention=attention,
            enforce_eager=enforce_eager, max_graph_query_len=max_graph_query_len, profile=profile, seed=seed,
        )
        from citer._C import BlockManager

        self.block_manager = BlockManager(num_blocks, block_size)
        runners = {name: ModelRunner(m, c, ops, self.block_manager, num_blocks, block_size, torch_device, torch_dtype)
                   for name, (m, c) in models.items()}
        self.slm_config, self.llm_config = slm_cfg, llm_cfg
        self.router = router_obj
        self.paths = {"slm": slm, "llm": llm, "router": router}
        eos = set()
        for c, path in ((slm_cfg, slm), (llm_cfg, llm)):
            if c is not None:
                eos.update(c.eos_token_ids)
                eos.update(_generation_eos(path))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        if self.config.use_cuda_graphs:
            attach_graphs(runners.get("slm"), runners.get("llm"), self.config, self.vocab_limit)
        self.core = EngineCore(self.config, self.block_manager, runners.get("slm"), runners.get("llm"),
                               router_obj, self.tokenizer, self.eos_token_ids, self.vocab_limit)
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()

    def set_router(self, router: Optional[str]) -> None:
        """Load (or, with None, drop) the router; requests already running keep their policy."""
        if router is not None and (self.core.slm is None or self.core.llm is None):
            raise ValueError("a router needs both an SLM and an LLM")
        folded = load_router(router, self.slm_config.hidden_size).to(self.config.device) if router else None
        self.router = self.core.router = folded
        self.paths["router"] = router

    def capture_cuda_graphs(self) -> int:
        """Capture every CUDA-graph bucket now, largest first, instead of at each bucket's
        first use (which costs that step a warm-up and a capture); -> graphs captured.
        Nothing to do without graphs (CPU, enforce_eager=True, profile=True)."""
        n = 0
        for which in ("llm", "slm"):  # the LLM's largest bucket sizes the shared pool
            runner = getattr(self.core, which)
            if runner is None or runner.graphs is None:
                continue
            n += runner.graphs.capture_all(with_router=False)
            if which == "slm" and self.router is not None:
                runner.graphs.use_router(self.router.params)
                n += runner.graphs.capture_all(with_router=True)
        return n

    @staticmethod
    def _default_kv_memory(device: torch.device) -> int:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * DEFAULT_GPU_KV_FRACTION)
        return DEFAULT_CPU_KV_MEMORY

    # ---- request construction (validates; changes no state) --------------------------
    def default_policy(self) -> str:
        if self.router is not None and self.core.llm is not None:
            return "router"
        return "slm" if self.core.slm is not None else "llm"

    def _prompt_ids(self, prompt: Prompt, index: int) -> List[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text, but the model folders have no tokenizer; "
                                 "pass token ids instead")
            ids = self.tokenizer(prompt).input_ids
        else:
            ids = list(prompt)
            if any(not isinstance(t, (int, np.integer)) for t in ids):
                raise ValueError(f"prompt {index} must be a string or a list of int token ids")
            ids = [int(t) for t in ids]
            bad = [t for t in ids if not 0 <= t < self.vocab_limit]
            if bad:
                raise ValueError(f"prompt {index} has token ids outside the vocabulary [0, {self.vocab_limit}): {bad[:5]}")
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        if len(ids) >= self.config.max_model_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; max_model_len is {self.config.max_model_len} "
                             "(prompt plus at least one new token must fit)")
        return ids

    def _make_seq(self, prompt: Prompt, params: SamplingParams, index: int, request_id: Optional[str]) -> Seq:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = self._prompt_ids(prompt, index)
        policy = params.policy or self.default_policy()
        threshold = params.threshold
        if threshold is None and self.router is not None:
            threshold = self.router.default_threshold
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**62))
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        seq = Seq(rid, ids, params, policy, threshold, seed)
        self.core.validate(seq)
        return seq

    @staticmethod
    def _as_prompt_list(prompts) -> List[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, (int, np.integer)) for t in prompts):
            return [prompts]  # one prompt of token ids
        return prompts

    # ---- step-level API (for servers) -------------------------------------------------
    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        seq = self._make_seq(prompt, params or SamplingParams(), 0, request_id)
        self.core.add_request(seq)
        return seq.request_id

    def step(self) -> List[TokenEvent]:
        """Advance every running request by one token; a finished request's last event carries its output."""
        return self.core.step()

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        return self.core.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    # ---- offline API ------------------------------------------------------------------
    def generate(self, prompts, params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = False) -> List[RequestOutput]:
        prompts = self._as_prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        seqs = [self._make_seq(p, sp, i, None) for i, (p, sp) in enumerate(zip(prompts, params_list))]
        outputs = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(seqs), desc="generate", unit="req")
        try:
            for seq in seqs:
                self.core.add_request(seq)
            while len(outputs) < len(seqs):
                for ev in self.core.step():
                    if ev.output is not None:
                        outputs[ev.request_id] = ev.output
                        if bar is not None:
                            bar.update(1)
                if not self.core.has_unfinished() and len(outputs) < len(seqs):
                    raise RuntimeError("engine went idle with requests unfinished")  # pragma: no cover
        except BaseException:
            for seq in seqs:
                self.core.abort(seq.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [outputs[s.request_id] for s in seqs]

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None) -> Iterator[TokenEvent]:
        """Yield this request's tokens as they are decided (other requests progress alongside)."""
        rid = self.add_request(prompt, params)
        try:
            while True:
                for ev in self.core.step():
                    if ev.request_id == rid:
                        yield ev
                        if ev.finish_reason is not None:
                            return
        finally:
            self.core.abort(rid)  # no-op when finished; frees blocks if the consumer stopped early

    def calibrate_threshold(self, prompts, target_llm_fraction: float, params: Optional[SamplingParams] = None,
                            iters: int = 10) -> Calibration:
        """Bisect the router threshold τ so that the LLM makes about target_llm_fraction of the
        generated tokens on these prompts (greedy unless params say otherwise)."""
        if self.router is None or self.core.llm is None:
            raise ValueError("calibrate_threshold needs a router and an LLM")
        if not 0.0 <= target_llm_fraction <= 1.0:
            raise ValueError(f"target_llm_fraction must be in [0, 1], got {target_llm_fraction!r}")
        base = params or SamplingParams()

        def share(tau: float) -> float:
            p = SamplingParams(**{**_params_kwargs(base), "policy": "router", "threshold": tau})
            outs = self.generate(prompts, p)
            n = sum(len(o.from_llm) for o in outs)
            return sum(sum(o.from_llm) for o in outs) / max(n, 1)

        lo, hi = 0.0, 1.0
        best = (abs(share(lo) - target_llm_fraction), lo, share(lo))
        for _ in range(iters):
            mid = (lo + hi) / 2
            s = share(mid)
            if abs(s - target_llm_fraction) < best[0]:
                best = (abs(s - target_llm_fraction), mid, s)
            if s < target_llm_fraction:
                lo = mid
            else:
                hi = mid
        return Calibration(threshold=best[1], llm_share=best[2], target=target_llm_fraction)


def _params_kwargs(p: SamplingParams) -> dict:
    keys = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
            "policy", "threshold", "llm_fraction", "confidence_threshold")
    return {k: getattr(p, k) for k in keys}


def _generation_eos(path: str) -> List[int]:
    fn = os.path.join(path, "generation_config.json")
    if not os.path.isfile(fn):
        return []
    with open(fn) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
