"""Copy a trained demo pair, its routers and baselines into the package.

  python -m citer.research.training.ship runs/demo                    # -> python/citer/assets/demo
  python -m citer.research.training.ship runs/free --task arith-free  # -> python/citer/assets/demo_free
  python -m citer.research.training.ship runs/real/citer --router qwen2.5-coder-0.5b-1.5b \
      --slm slm/                                         # -> python/citer/assets/routers/<name>, folded float16

slm, llm and router are required; router_s (CITER-S), router_hidden (the hidden-only
ablation) and baselines/{query,colm} (`citer train-baselines`) are shipped when present.
"""
import argparse
import dataclasses
import os
import shutil

import torch

from citer.assets import PAIRS, ROUTERS_DIR
from citer.engine.models.config import load_model_config
from citer.engine.models.router import load_router, save_folded

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "training_log.json")
ROUTER_FILES = ("router.safetensors", "router_config.json")
QUERY_FILES = ("query_router.safetensors", "config.json")
PARTS = (("slm", MODEL_FILES, True), ("llm", MODEL_FILES, True), ("router", ROUTER_FILES, True),
         ("router_s", ROUTER_FILES, False), ("router_hidden", ROUTER_FILES, False),
         ("baselines/query", QUERY_FILES, False), ("baselines/colm", ROUTER_FILES, False))


def ship(run_dir: str, dest: str) -> None:
    for name, files, required in PARTS:
        src, dst = os.path.join(run_dir, name), os.path.join(dest, name)
        if not os.path.isdir(src):
            if required:
                raise FileNotFoundError(f"{src} is missing: train it first (see the Makefile target 'assets')")
            continue
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        for f in files:
            if os.path.isfile(os.path.join(src, f)):
                shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dest) for f in fs)
    print(f"shipped {run_dir} -> {dest} ({total / 1e6:.2f} MB)")


def ship_router(src: str, name: str, slm: str, dtype: torch.dtype = torch.float16) -> str:
    """A trained router for a public pair -> assets/routers/<name>: the folded inference form
    in float16 (a quarter of the training checkpoint), meta without local paths, plus the
    SLM's shape so that load_router refuses it over another SLM."""
    cfg = load_model_config(slm)
    router = load_router(src, cfg.hidden_size)
    meta = {k: v for k, v in router.meta.items() if k not in ("slm", "llm")}
    meta.update(slm=os.path.basename(os.path.normpath(router.meta.get("slm", slm))),
                llm=os.path.basename(os.path.normpath(router.meta.get("llm", ""))), slm_shape=cfg.router_shape())
    dest = os.path.join(ROUTERS_DIR, name)
    shutil.rmtree(dest, ignore_errors=True)
    save_folded(dataclasses.replace(router, meta=meta), dest, dtype)
    shipped = load_router(dest, cfg.hidden_size, cfg.router_shape())
    h = torch.randn(4096, cfg.hidden_size) * 2
    sig = torch.randn(4096, 3) if router.head_signals else None
    err = (shipped.score(h, sig) - router.score(h, sig)).abs().max().item()
    size = sum(os.path.getsize(os.path.join(dest, f)) for f in os.listdir(dest))
    print(f"shipped {src} -> {dest} ({size / 1e6:.2f} MB, {dtype}; max |score change| {err:.1e} on random input)")
    return dest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--task", default="arith", choices=sorted(PAIRS))
    ap.add_argument("--router", metavar="NAME", help="ship run_dir as a router for a public pair under this name")
    ap.add_argument("--slm", help="with --router: the SLM folder it routes over (its shape is recorded)")
    args = ap.parse_args()
    if args.router:
        if not args.slm:
            ap.error("--router needs --slm")
        ship_router(args.run_dir, args.router, args.slm)
    else:
        ship(args.run_dir, PAIRS[args.task])


if __name__ == "__main__":
    main()
