"""Shared pieces of the CPU/GPU end-to-end benchmarks: random models at real shapes, timing."""
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List

import torch

QWEN2_SHAPES = {
    # ~100M parameters: the mid-size model (hidden 768, 12 layers, vocab 32000)
    "qwen2-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, vocab_size=32000),
    # ~10M parameters: a tenth of the above, the SLM of the routed benchmark
    "qwen2-10m": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=32000),
    # real Qwen2 shapes (random weights): the GPU benchmarks' SLM / LLM
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064),
    # ~1M non-embedding parameters: per-step overhead dominates
    "qwen2-tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=32000),
}


def build_random_qwen2(name: str, root: str, seed: int = 0, dtype=torch.float32, device: str = "cpu") -> str:
    """Save a random-weight Qwen2 model of a named shape under root; -> folder. device:
    where the weights are initialised (a GPU makes billion-parameter models in seconds)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = os.path.join(root, f"{name}-{str(dtype).removeprefix('torch.')}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    cfg = Qwen2Config(**QWEN2_SHAPES[name], tie_word_embeddings=True, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    return path


def num_params(path: str) -> int:
    from citer.engine.models.loader import num_parameters

    return num_parameters(path)


def interleaved_medians(fns: Dict[str, Callable[[], float]], repeats: int, progress=None) -> Dict[str, List[float]]:
    """Run each fn once per round, in turn, `repeats` rounds -> name -> list of results.

    Interleaving spreads machine noise (other processes, thermal) across all contenders."""
    results: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            results[name].append(fn())
            if progress is not None:
                progress.update(1)
    return results


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: List[float]) -> float:
    return statistics.median(xs)


def add_run_args(ap) -> None:
    """The decode-run options both end-to-end benchmarks share."""
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())


def scratch_dir() -> str:
    root = os.environ.get("CITER_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "citer-bench-models")
    os.makedirs(root, exist_ok=True)
    return root


def add_pair_args(ap) -> None:
    """--slm / --llm: the random-weight Qwen2 shapes of the CPU routed-decoding benchmarks,
    or checkpoint folders (e.g. the real pair's, benchmarks/fetch_real_pair.py)."""
    ap.add_argument("--llm", default="qwen2-100m", help="a random-weight shape's name or a checkpoint folder")
    ap.add_argument("--slm", default="qwen2-10m", help="a random-weight shape's name or a checkpoint folder")


def make_router(hidden: int, path: str, features: str = "hidden", dtype: str = "float32") -> str:
    """An untrained (seeded) CITER router for an SLM of this hidden size, saved to path (as
    its training network, or with dtype="float16" folded in float16 as shipped routers are)."""
    from citer.engine.models.router import load_router, save_folded
    from citer.research.router_nets import RouterMLP, save_router

    torch.manual_seed(0)
    save_router(RouterMLP(hidden, features=features).eval(), path)
    if dtype != "float32":
        folded = load_router(path)
        for name in os.listdir(path):
            os.remove(os.path.join(path, name))
        save_folded(folded, path, getattr(torch, dtype))
    return path


def build_pair(args):
    """-> (slm_path, llm_path): the pair named by add_pair_args; random-weight shapes are
    built once and cached in scratch_dir(), folders are used as they are."""
    root = scratch_dir()

    def path(name: str, seed: int) -> str:
        folder = os.path.expanduser(name)
        return folder if os.path.isdir(folder) else build_random_qwen2(name, root, seed=seed)

    llm_path = path(args.llm, 1)
    return path(args.slm, 2), llm_path
