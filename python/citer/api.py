"""Engine: the public entry point (load models, generate, stream, step-level API).

A thin layer over citer.engine.EngineCore: construction is citer.builder.build_core,
every request is checked by EngineCore.make_sequences, and a step is EngineCore.step.
"""
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np

from citer.engine.args import EngineArgs
from citer.engine.core import STEP_API
from citer.engine.outputs import RequestOutput, TokenEvent, llm_share
from citer.engine.requests import Prompt
from citer.engine.sampling_params import SamplingParams

from .builder import build_core, fold_router


@dataclass
class Calibration:
    threshold: float
    llm_share: float  # share of generated tokens the LLM made at that threshold
    target: float


class Engine:
    """Token-level routed decoding between a small (SLM) and a large (LLM) model.

    Engine(slm, llm=None, router=None, **options): the options are EngineArgs' fields
    (device, dtype, block_size, num_blocks or kv_cache_memory, max_model_len, ...; see
    citer.engine.args), or Engine.from_args(EngineArgs(...)). Checkpoints are Hugging
    Face folders. With no model arguments it loads the embedded default pair and router
    (see citer.assets).
    On CUDA (Triton backend) the SLM decode step and LLM catch-ups of up to
    max_graph_query_len tokens replay CUDA graphs; enforce_eager=True turns them off.
    attention="flash-attn" uses flash-attn's paged attention (CUDA, fp16/bf16,
    block_size a multiple of 256) instead of the Triton kernel.
    """

    def __init__(self, slm: Optional[str] = None, llm: Optional[str] = None, router: Optional[str] = None,
                 **options):
        self._init(EngineArgs(slm, llm, router, **options))

    @classmethod
    def from_args(cls, args: EngineArgs) -> "Engine":
        """An engine from EngineArgs (what AsyncEngine and `citer serve` pass through)."""
        if not isinstance(args, EngineArgs):
            raise TypeError(f"Engine.from_args takes EngineArgs, got {type(args).__name__}")
        engine = cls.__new__(cls)
        engine._init(args)
        return engine

    def _init(self, args: EngineArgs) -> None:
        if args.uses_default_pair:
            from .assets import default_paths

            slm, llm, router = default_paths()
            args = replace(args, slm=slm, llm=llm, router=router)
        elif args.router is not None:
            from .assets import router_path

            args = replace(args, router=router_path(args.router))  # a shipped router's name -> its folder
        self.args = args
        self.core = build_core(args)
        self.paths = {"slm": args.slm, "llm": args.llm, "router": args.router}

    # ---- what the engine holds (one copy each, in the core) ----------------------------
    @property
    def config(self):
        return self.core.config

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def router(self):
        return self.core.router

    @property
    def block_manager(self):
        return self.core.bm

    @property
    def vocab_limit(self) -> int:
        return self.core.vocab_limit

    @property
    def eos_token_ids(self) -> List[int]:
        return sorted(self.core.eos_token_ids)

    @property
    def slm_config(self):
        """The SLM's citer.engine.models.ModelConfig (None without an SLM)."""
        return self.core.slm.cfg if self.core.slm is not None else None

    @property
    def llm_config(self):
        return self.core.llm.cfg if self.core.llm is not None else None

    @property
    def backend(self) -> str:
        return (self.core.slm or self.core.llm).ops.name

    def set_router(self, router: Optional[str]) -> None:
        """Load (or, with None, drop) the router; requests already running keep their policy."""
        if router is not None and (self.core.slm is None or self.core.llm is None):
            raise ValueError("a router needs both an SLM and an LLM")
        if router is not None:
            from .assets import router_path

            router = router_path(router)
        cfg = self.core.slm.cfg if self.core.slm is not None else None
        folded = fold_router(router, cfg, self.core.slm.device, self.backend) if router else None
        self.core.set_router(folded)  # refuses to drop a router that live requests route with
        self.paths["router"] = router

    def close(self) -> None:
        """Stop the tensor-parallel LLM's worker processes (if any); the engine is unusable after."""
        group = getattr(getattr(self.core.llm, "model", None), "group", None) if self.core.llm is not None else None
        if group is not None:
            group.close()

    def capture_cuda_graphs(self, speculative: bool = False) -> int:
        """Capture every CUDA-graph bucket now, largest first, instead of at each bucket's
        first use (which costs that step a warm-up and a capture); -> graphs captured.
        speculative=True also captures the buckets only speculative decoding and
        check-and-correct use. Nothing to do without graphs (CPU, enforce_eager=True)."""
        n = self.core.llm.capture_graphs(speculative=speculative) if self.core.llm is not None else 0  # sizes the pool
        if self.core.slm is not None:
            n += self.core.slm.capture_graphs(self.router.params if self.router is not None else None, speculative)
        return n

    # ---- step-level API (for servers) -------------------------------------------------
    # generate, stream and the step API may be mixed on one engine (from one thread at a
    # time): each request belongs to the consumer that added it, and its events and
    # output reach that consumer only, exactly once. See "Mixing the APIs" in the README.
    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Queue a request for the step API; -> its id. The request keeps its own copy of
        params. Raises (ValueError / TypeError, naming the problem) before anything changes."""
        return self.core.add(self.core.make_sequences(prompt, params or SamplingParams(), 0, request_id), STEP_API)

    def step(self) -> List[TokenEvent]:
        """Advance every running request by one token; -> the events of the step API's own
        requests: this step's, and any made while generate() or a stream drove the
        engine. A request's last event carries its output (finish_reason "stop",
        "length", or "error" with token_id None when it failed in a step). If the step
        fails as a whole the error propagates; the events made before it, and the failed
        requests' "error" events, come with the next call."""
        if self.core.has_unfinished():
            self.core.step()
        return self.core.take(STEP_API)

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """End a live request and free its blocks; -> its output, or None when the id is
        unknown or the request already finished (a no-op). A stream or generate() that
        owns the request ends with an "abort" final event."""
        return self.core.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    # ---- offline API ------------------------------------------------------------------
    def generate(self, prompts, params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = False) -> List[RequestOutput]:
        """Run these prompts to the end -> one output each, in order (with n > 1 samples,
        n outputs per prompt, one after the other; output.index says which). Other
        consumers' requests progress alongside; their events wait for them. Raises if one
        of these requests fails (its error named), after aborting the others."""
        prompts = _as_prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(prompts)
        else:
            if isinstance(params, dict) or not hasattr(params, "__iter__"):
                raise TypeError(f"params must be SamplingParams or a list of them (one per prompt), "
                                f"got {type(params).__name__}")
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        seqs = [s for i, (p, sp) in enumerate(zip(prompts, params_list)) for s in self.core.make_sequences(p, sp, i)]
        me, outputs, bar = object(), {}, None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(seqs), desc="generate", unit="req")
        try:
            for seq in seqs:
                if seq.index == 0:
                    self.core.add(seq.group or [seq], me)
            while len(outputs) < len(seqs):
                self.core.step()
                for ev in self.core.take(me):
                    if ev.finish_reason in ("error", "abort"):
                        raise RuntimeError(f"request {ev.request_id!r} of this generate() ended with "
                                           f"{ev.finish_reason}: {ev.output.error or 'aborted'}")
                    if ev.output is not None:
                        outputs[ev.request_id] = ev.output
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for seq in seqs:
                self.core.abort(seq.request_id)
            raise
        finally:
            self.core.release(me)
            if bar is not None:
                bar.close()
        return [outputs[s.request_id] for s in seqs]

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None) -> Iterator[TokenEvent]:
        """Yield this request's events as its tokens are decided (other requests progress
        alongside). Ends after the final event: also when the request is aborted by
        someone else (an "abort" event with token_id None); raises RuntimeError when it
        fails in a step. Closing the stream early aborts the request."""
        me = object()
        seqs = self.core.make_sequences(prompt, params or SamplingParams(), 0)
        rid = self.core.add(seqs, me)
        live = len(seqs)  # with n > 1 samples, events of all of them (event.request_id "<id>#<i>")
        try:
            while True:
                for ev in self.core.take(me):
                    if ev.finish_reason == "error":
                        raise RuntimeError(f"request {ev.request_id!r} failed: {ev.output.error}")
                    yield ev
                    live -= ev.finish_reason is not None
                    if not live:
                        return
                self.core.step()
        finally:
            self.core.abort(rid)  # no-op when finished; frees blocks if the consumer stopped early
            self.core.release(me)

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
            return llm_share(self.generate(prompts, replace(base, policy="router", threshold=tau)))

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


def _as_prompt_list(prompts) -> List[Prompt]:
    """One prompt (a string, token ids) or a list of them -> a list of prompts."""
    if prompts is None:
        raise ValueError("prompts is None; pass a string, a list of token ids, or a list of those")
    if isinstance(prompts, (str, bytes, bytearray)):
        return [prompts]  # bytes: refused with its index by the request checks
    if hasattr(prompts, "shape") and hasattr(prompts, "dtype"):  # an array / tensor: one row per prompt
        return [prompts] if len(prompts.shape) == 1 else list(prompts)
    if isinstance(prompts, dict) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts must be a string, a list of token ids, or a list of those; "
                        f"got {type(prompts).__name__}")
    prompts = list(prompts)
    if prompts and all(isinstance(t, (int, np.integer)) for t in prompts):
        return [prompts]  # one prompt of token ids
    return prompts
