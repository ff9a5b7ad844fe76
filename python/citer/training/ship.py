"""Copy a trained demo pair and its routers into the package (python/citer/assets/demo).

  python -m citer.training.ship runs/demo
"""
import os
import shutil
import sys

from citer.assets import DEMO_DIR

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "training_log.json")
ROUTER_FILES = ("router.safetensors", "router_config.json")


def ship(run_dir: str, dest: str = DEMO_DIR) -> None:
    for name, files in (("slm", MODEL_FILES), ("llm", MODEL_FILES), ("router", ROUTER_FILES),
                        ("router_s", ROUTER_FILES)):
        src, dst = os.path.join(run_dir, name), os.path.join(dest, name)
        if not os.path.isdir(src):
            raise FileNotFoundError(f"{src} is missing: train it first (see the Makefile target 'assets')")
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        for f in files:
            if os.path.isfile(os.path.join(src, f)):
                shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dest) for f in fs)
    print(f"shipped {run_dir} -> {dest} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    ship(sys.argv[1])
