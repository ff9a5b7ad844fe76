"""Copy a trained demo pair, its routers and baselines into the package.

  python -m citer.research.training.ship runs/demo                    # -> python/citer/assets/demo
  python -m citer.research.training.ship runs/free --task arith-free  # -> python/citer/assets/demo_free

slm, llm and router are required; router_s (CITER-S), router_hidden (the hidden-only
ablation) and baselines/{query,colm} (`citer train-baselines`) are shipped when present.
"""
import argparse
import os
import shutil

from citer.assets import PAIRS

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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--task", default="arith", choices=sorted(PAIRS))
    args = ap.parse_args()
    ship(args.run_dir, PAIRS[args.task])


if __name__ == "__main__":
    main()
