"""citer eval's sweep, table and plot on tiny random models and a toy task."""
import json
import os

import torch

from citer import Engine
from citer.evaluate import sweep, table, write
from citer.router import RouterMLP, save_router
from test_router_training import ToyTask


def test_sweep_covers_every_method_and_writes_json_and_plot(hf_models, tmp_path):
    torch.manual_seed(0)
    for name in ("r", "rs"):
        save_router(RouterMLP(64).eval(), str(tmp_path / name))
    engine = Engine(hf_models["qwen2"][0], hf_models["llama"][0], str(tmp_path / "r"), block_size=8,
                    num_blocks=128, max_model_len=128, max_num_seqs=8)
    rows = sweep(engine, ToyTask(), n=4, router_s=str(tmp_path / "rs"), max_tokens=6)
    methods = {r["method"] for r in rows}
    assert methods == {"slm", "llm", "random", "confidence", "CITER", "CITER-S"}
    by = {r["method"]: r for r in rows if r["knob"] is None}
    assert by["slm"]["llm_share"] == 0.0 and by["llm"]["llm_share"] == 1.0
    assert by["slm"]["llm_forward_tokens"] == 0 and by["llm"]["slm_forward_tokens"] == 0
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["ms_per_token"] > 0 for r in rows)
    out = tmp_path / "eval"
    write(rows, str(out), "toy")
    with open(out / "eval.json") as f:
        assert json.load(f) == rows
    assert os.path.getsize(out / "accuracy_vs_llm_share.png") > 10_000
    assert table(rows).splitlines()[0].split()[:2] == ["method", "knob"]
