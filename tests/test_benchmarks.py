"""The GPU check's scripts on a CPU: gpu_check.sh refuses cleanly, the decode benchmark's
smoke run writes the JSON the quick check's summary reads, and the summary tells ok,
failed and timed-out parts apart. (On a GPU, benchmarks/gpu_check.sh runs them for real.)"""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **kw):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_gpu_check_needs_a_gpu_and_says_so():
    if torch.cuda.is_available():
        return  # on a GPU machine the script runs for real
    res = _run(["bash", "benchmarks/gpu_check.sh", "quick"], env={**os.environ, "PY": sys.executable})
    assert res.returncode != 0
    assert "needs a CUDA GPU" in res.stdout and "Nothing was run" in res.stdout
    assert "Traceback" not in res.stdout + res.stderr


def test_decode_smoke_json_feeds_the_summary(tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    res = _run([sys.executable, "benchmarks/decode_gpu.py", "--shapes", "tiny", "--device", "cpu", "--dtype",
                "float32", "--modes", "eager", "--batches", "1", "--steps", "2", "--repeats", "1", "--prompt-len", "4",
                "--no-transformers", "--json", str(log / "headline.json")],
               env={**os.environ, "CITER_BENCH_DIR": str(tmp_path / "models")})
    assert res.returncode == 0, res.stderr[-3000:]
    h = json.loads((log / "headline.json").read_text())
    assert {r["policy"] for r in h["rows"]} == {"slm", "slm+router", "llm", "routed@0.15"}
    assert h["derived"][0]["routed_vs_llm"] > 0
    (log / "parts").write_text("kernels 0 41 90\ngraphs 1 12 80\nparity 124 50 50\nheadline 0 70 160\n")
    (log / "kernels.log").write_text("....\n9 passed in 38.20s\n")
    (log / "graphs.log").write_text("F..\n1 failed, 2 passed in 11.00s\n")
    res = _run([sys.executable, "benchmarks/gpu_summary.py", str(log)])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(ln.startswith("kernels   ok") and "9 passed" in ln for ln in lines)
    assert any(ln.startswith("graphs    FAIL (rc 1)") and "1 failed" in ln for ln in lines)
    assert any(ln.startswith("parity    TIMEOUT") for ln in lines)
    assert any("eager slm:" in ln and "weight-bandwidth bound" in ln for ln in lines)
    assert any("faster than LLM-only" in ln for ln in lines)


def test_a_replayed_trace_does_the_recorded_work(hf_models, router_path):
    """compare_policies' replay: a method's recorded choices, replayed on another pair of
    models, reproduce its LLM calls, verifications, rollbacks and forward counts."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from citer.research.replay import record, replaying

    from citer import Engine, SamplingParams
    from conftest import random_prompts

    kw = dict(block_size=4, num_blocks=64, max_model_len=64)
    first = Engine(hf_models["qwen2"][0], hf_models["llama"][0], router_path, **kw)
    other = Engine(hf_models["llama"][0], hf_models["llama"][0], **kw)  # agrees with itself: nothing rejected
    prompts = random_prompts(2, 3, 9, seed=3)
    keys = ("llm_calls", "slm_forward_tokens", "llm_forward_tokens", "slm_discarded_tokens", "llm_discarded_tokens")
    for params in (dict(policy="speculative", num_draft_tokens=3), dict(policy="random", llm_fraction=0.3,
                                                                         verify=True, seed=1)):
        got = {}
        with record(first, got):
            outs = first.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True, **params))
        traces = {f"r{i}": dict(got[o.request_id].to_json()) for i, o in enumerate(outs)}
        replayed = []
        with replaying(traces):
            for i, p in enumerate(prompts):
                rid = other.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True, **params),
                                        request_id=f"r{i}")
                done = None
                while done is None:
                    done = next((ev.output for ev in other.step() if ev.request_id == rid and ev.output), None)
                replayed.append(done)
        for o, r in zip(outs, replayed):
            assert [o.stats[k] for k in keys] == [r.stats[k] for k in keys]
            assert o.from_llm == r.from_llm


def test_serve_load_runs_every_path_and_writes_its_json(tmp_path):
    """The serving benchmark end to end at a tiny size: both layer children, the server,
    the three concurrency levels; its JSON holds every number it prints."""
    out = tmp_path / "serve.json"
    res = _run([sys.executable, "benchmarks/serve_load.py", "--requests", "2", "--max-tokens", "4", "--repeats", "1",
                "--json", str(out)])
    assert res.returncode == 0, res.stdout + res.stderr
    got = json.loads(out.read_text())
    assert got["sync_ms_per_token"] > 0 and got["async_ms_per_token"] > 0 and got["http_ms_per_token"] > 0
    assert 0 < got["sync_step_ms"] <= got["sync_ms_per_token"]
    assert [r["concurrency"] for r in got["load"]] == [1, 8, 32]
    assert all(r["tokens"] > 0 and r["ttft_p50"] > 0 for r in got["load"])


def test_cost_calibration_script_runs(tmp_path):
    """gpu_check.sh costmodel's script at a tiny shape on the CPU: every step timed, the JSON written."""
    out = tmp_path / "cost.json"
    res = _run([sys.executable, "benchmarks/cost_calibrate.py", "--device", "cpu", "--shape", "qwen2-tiny",
                "--rows", "1", "2", "--contexts", "16", "--repeats", "1", "--json", str(out)])
    assert res.returncode == 0, res.stdout + res.stderr
    got = json.loads(out.read_text())
    assert len(got["rows"]) == 4 and all(r["measured_ms"] > 0 and r["model_ms"] > 0 for r in got["rows"])


def test_cpu_layer_benchmark_runs(hf_models):
    """benchmarks/cpu_layer.py at a tiny size: both paths run, their tokens are checked equal, a table last."""
    res = _run([sys.executable, "benchmarks/cpu_layer.py", "--models", hf_models["qwen2"][0], "--dtypes", "float32",
                "--prompt-len", "6", "--new-tokens", "3", "--repeats", "1"])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    row = [line for line in res.stdout.splitlines() if line.startswith(os.path.basename(hf_models["qwen2"][0]))]
    assert len(row) == 1 and float(row[0].split()[-1]) > 0


def test_cpu_vs_llamacpp_transformers_rows(hf_models, monkeypatch):
    """cpu_vs_llamacpp.py's transformers runner: its greedy tokens are citer's (float32), and
    without torchao the int8 row is skipped with a reason that names torchao."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import cpu_vs_llamacpp as bench
    finally:
        sys.path.pop(0)
    from citer import Engine, SamplingParams

    path = hf_models["llama"][0]
    prompt = [5, 17, 42, 9, 33, 2, 60]
    model, why = bench.load_hf(path, torch.float32, int8=False)
    assert why is None
    engine = Engine(llm=path, max_model_len=64, num_blocks=16)
    want = engine.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    engine.close()
    assert bench.hf_generate(model, prompt, 6, compiled=False) == want
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as if torchao were absent
    model, why = bench.load_hf(path, torch.bfloat16, int8=True)
    assert model is None and "torchao" in why and "pip install torchao" in why
