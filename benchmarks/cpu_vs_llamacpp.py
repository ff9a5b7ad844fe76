"""citer against the CPU engines users know, on the same weights: llama.cpp (llama-cpp-python)
and transformers, batch 1, greedy, a 64-token prompt, 64 new tokens, medians of interleaved
runs, ms per generated token (prefill included, as each engine's generate pays it).

Precisions compared like with like: citer float32 / llama.cpp F32 / transformers float32;
citer bfloat16 / llama.cpp F16 and BF16 / transformers bfloat16; citer int8 (weight-only,
per-channel, on the layers' projections and the lm_head / tied embedding; bfloat16
activations) / llama.cpp Q8_0 (8.5 bits per weight everywhere, the output matrix included). Models: the
small-Llama shape (hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536, vocab 49152,
tied; random weights) and, with --real, the
Qwen2.5-Coder-0.5B and 1.5B checkpoints (benchmarks/fetch_real_pair.py, then citer convert
to float32 HF folders). Every model is written as an HF folder and as GGUF files
(citer.research.gguf_export); llama.cpp's greedy tokens on the F32 file are checked equal
to citer's before anything is timed. (llama-cpp-python exposes no two-model speculative
decoding, only prompt lookup, so the routed pair is compared with llama.cpp's LLM alone in
docs/real-pair.md.) llama.cpp's Q8_0 runs without its AMX kernel, which dies with an illegal
instruction on this machine (load_llama_cpp).

PyTorch's own answer on these CPUs is the third reference: transformers with torchao's int8
weight-only quantization (`quantize_(model, Int8WeightOnlyConfig())`, every nn.Linear, the
lm_head included; bfloat16 activations) beside citer int8, and with --compile transformers'
generate with a static KV cache and its decode step compiled by torch.compile (inductor,
mode "default": CUDA graphs do not apply on CPU) at every precision. The first compiled call's
time (the compile) is reported beside the per-token times, which are timed after it; the
compiled float32 run's greedy tokens are checked equal to the eager run's.

llama-cpp-python is optional: `pip install llama-cpp-python` builds llama.cpp from source
(about 15 minutes on 2 cores; the registry's sdist, e.g. CMAKE_ARGS="-DGGML_NATIVE=ON");
without it the llama.cpp columns are skipped and say so. torchao too (`pip install torchao`,
pure Python on CPU; its GPU libraries fail to load and say so, harmlessly): without it the
torchao rows are skipped and say so.

    .venv/bin/python benchmarks/cpu_vs_llamacpp.py [--real] [--compile] [--threads 2] [--json out.json]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

SMALL_LLAMA = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                   rms_norm_eps=1e-5, rope_theta=10000.0)
REAL = "~/.cache/citer/real-pair/hf/qwen2.5-coder-{}-instruct"


def small_llama(root: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from citer.research.tasks.bpe_tokenizer import train_tokenizer

    path = os.path.join(root, "small-llama-f32")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):  # llama.cpp loads no GGUF without a tokenizer
        torch.manual_seed(0)  # a small BPE (ids past it are unused tokens in the GGUF); eos 0 as in its tokenizer
        model = LlamaForCausalLM(LlamaConfig(bos_token_id=0, eos_token_id=0, initializer_range=0.05, **SMALL_LLAMA))
        model.save_pretrained(path)
        with open(__file__) as f:
            train_tokenizer(f.read().splitlines(), vocab_size=400).save_pretrained(path)
    return path


def ggufs(path: str, root: str, kinds) -> dict:
    """The HF folder as GGUF files of these types (cached) -> kind -> file."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from citer.research.gguf_export import write_gguf

    out, model, tok = {}, None, None
    name = os.path.basename(os.path.normpath(path))
    for kind in kinds:
        fn = os.path.join(root, f"{name}-{kind}.gguf")
        if not os.path.isfile(fn):
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                tok = AutoTokenizer.from_pretrained(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) \
                    else None
            arch = model.config.model_type
            write_gguf(fn + ".tmp", model, arch, getattr(gguf.GGMLQuantizationType, kind), tok)
            os.replace(fn + ".tmp", fn)
        out[kind] = fn
    return out


def load_llama_cpp(fn: str, threads: int, extra_buffers: bool = True):
    """llama.cpp's Llama for this GGUF file. extra_buffers=False loads the weights without
    llama.cpp's extra CPU buffer types (its AMX and repacked layouts): on this machine its AMX
    Q8_0 kernel dies with an illegal instruction (a tile load, in a process without torch too),
    so Q8_0 runs on its AVX-512 dot products, as on any CPU without AMX."""
    import llama_cpp.llama as api

    defaults = api.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = extra_buffers
        return p

    api.llama_cpp.llama_model_default_params = params  # llama-cpp-python has no argument for it
    try:
        return api.Llama(model_path=fn, n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512,
                         verbose=False, logits_all=False)
    finally:
        api.llama_cpp.llama_model_default_params = defaults


def llama_generate(llm, prompt, n: int):
    llm.reset()
    out = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if len(out) == n:
            break
    return out


def time_runs(fns: dict, repeats: int) -> dict:
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


GROUPS = (  # one precision at a time (loaded, timed interleaved, freed): a 1.5B in float32 three times over
    ("float32", dict(dtype="float32"), torch.float32, ("F32",)),  # would not fit this machine's 24 GB
    ("bfloat16", dict(dtype="bfloat16"), torch.bfloat16, ("F16", "BF16")),
    ("int8", dict(dtype="bfloat16", quantization="int8"), torch.bfloat16, ("Q8_0",)),  # int8 weights, bf16 activations
)


def load_hf(path: str, dtype: torch.dtype, int8: bool):
    """transformers' model in this dtype; int8: its nn.Linear layers quantized by torchao
    (int8 weight-only, per channel) -> (model, None), or (None, why) without torchao."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if int8:
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError as e:
            return None, f"torchao not importable ({e}; pip install torchao)"
        quantize_(model, Int8WeightOnlyConfig())
    return model, None


def hf_generate(model, prompt, n: int, compiled: bool):
    """transformers' greedy generate; compiled: a static KV cache and the decode step through
    torch.compile (transformers compiles on CPU only when asked: CompileConfig's
    _compile_all_devices)."""
    from transformers.generation.configuration_utils import CompileConfig

    if compiled:
        config = CompileConfig(mode="default")
        config._compile_all_devices = True
        kw = dict(cache_implementation="static", compile_config=config)
    else:
        kw = dict(disable_compile=True)
    with torch.inference_mode():
        return model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, **kw)[0, len(prompt):].tolist()


def bench(path: str, root: str, args) -> dict:
    import gc

    from citer import Engine, SamplingParams

    n, g = args.new_tokens, torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 30000, (args.prompt_len,), generator=g).tolist()
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    row = {"model": os.path.basename(path.rstrip("/")), "llama_cpp": None, "ms_per_token": {}, "compile_s": {},
           "notes": []}
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        row["llama_cpp"] = f"not importable ({e}; pip install llama-cpp-python: ~15 min build)"
    files = ggufs(path, root, [k for *_, ks in GROUPS for k in ks]) if row["llama_cpp"] is None else {}

    for name, options, hf_dtype, kinds in (g for g in GROUPS if g[0] in args.precisions):
        engine = Engine(llm=path, max_model_len=256, num_blocks=64, **options)
        fns = {f"citer {name}": (lambda e=engine: e.generate([prompt], params))}
        hf, why = load_hf(path, hf_dtype, int8=name == "int8")
        label = "transformers int8 (torchao)" if name == "int8" else f"transformers {name}"
        if hf is None:
            row["notes"].append(f"{label}: {why}")
        else:
            fns[label] = lambda m=hf: hf_generate(m, prompt, n, compiled=False)
            if args.compile:  # compiled once here, then timed with the rest
                t0 = time.perf_counter()
                compiled = hf_generate(hf, prompt, n, compiled=True)
                row["compile_s"][f"{label} + compile"] = time.perf_counter() - t0
                if name == "float32":
                    row["compiled_tokens_equal_eager"] = compiled == hf_generate(hf, prompt, n, compiled=False)
                fns[f"{label} + compile"] = lambda m=hf: hf_generate(m, prompt, n, compiled=True)
        lls = {k: load_llama_cpp(files[k], args.threads, extra_buffers=k != "Q8_0") for k in kinds if k in files}
        if "F32" in lls:  # same weights, same greedy tokens, before anything is timed
            ref = engine.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))[0].token_ids
            got = llama_generate(lls["F32"], prompt, 16)
            row["llama_cpp_f32_tokens_equal"] = got == ref
            if got != ref:
                print(f"llama.cpp F32 tokens differ from citer's: {got} vs {ref}")
        fns.update({f"llama.cpp {k}": (lambda m=m: llama_generate(m, prompt, n)) for k, m in lls.items()})
        t = time_runs(fns, args.repeats)
        row["ms_per_token"].update({k: v / n * 1e3 for k, v in t.items()})
        print(row["model"], {k: round(v / n * 1e3, 2) for k, v in t.items()}, flush=True)
        engine.close()
        for m in lls.values():
            m.close()
        del engine, fns, lls
        hf = None
        torch._dynamo.reset()  # the compiled graphs hold the model's weights
        gc.collect()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true", help="also the Qwen2.5-Coder 0.5B and 1.5B checkpoints")
    ap.add_argument("--real-sizes", nargs="+", default=["0.5b", "1.5b"], help="with --real: which of them")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true",
                    help="also transformers with torch.compile (static cache): about a minute of compile per model "
                         "and precision on 2 cores")
    ap.add_argument("--precisions", nargs="+", default=[g[0] for g in GROUPS], choices=[g[0] for g in GROUPS])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = os.environ.get("CITER_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "citer-bench-models")
    os.makedirs(root, exist_ok=True)
    paths = [small_llama(root)]
    if args.real:
        paths += [os.path.expanduser(REAL.format(s)) for s in args.real_sizes]
    rows = [bench(p, root, args) for p in paths]
    pairs = [("citer float32", "llama.cpp F32"), ("citer bfloat16", "llama.cpp F16"),
             ("citer bfloat16", "llama.cpp BF16"), ("citer int8", "llama.cpp Q8_0"),
             ("citer float32", "transformers float32"), ("citer bfloat16", "transformers bfloat16"),
             ("citer int8", "transformers int8 (torchao)"), ("citer float32", "transformers float32 + compile"),
             ("citer bfloat16", "transformers bfloat16 + compile"),
             ("citer int8", "transformers int8 (torchao) + compile")]
    print(f"\nbatch 1, greedy, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} threads, "
          f"median of {args.repeats} interleaved runs; ms per generated token")
    for r in rows:
        print(f"\n{r['model']}" + (f" (llama.cpp: {r['llama_cpp']})" if r["llama_cpp"] else
                                   f" (llama.cpp F32 tokens equal citer's: {r.get('llama_cpp_f32_tokens_equal')})"))
        for note in r["notes"]:
            print(f"  ({note})")
        for k, v in r["ms_per_token"].items():
            print(f"  {k:<38} {v:8.2f}" + (f"   (compile: first call {r['compile_s'][k]:.1f} s)"
                                            if k in r["compile_s"] else ""))
        if "compiled_tokens_equal_eager" in r:
            print(f"  transformers float32 + compile: greedy tokens equal eager's: {r['compiled_tokens_equal_eager']}")
        for a, b in pairs:
            if a in r["ms_per_token"] and b in r["ms_per_token"]:
                print(f"  {a} / {b}: {r['ms_per_token'][a] / r['ms_per_token'][b]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
