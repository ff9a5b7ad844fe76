#!/usr/bin/env python3
"""GGUF checkpoints on the real pair: citer vs transformers, and `citer convert`.

For each of the two GGUF files benchmarks/fetch_real_pair.py assembles (Qwen2.5-Coder 0.5B and
1.5B Instruct, Q4_K_M), one model in memory at a time:

1. citer loads the GGUF in float32 (timed: reading the file, dequantizing into the model, the
   tokenizer) and greedy-decodes 24 tokens (EOS ignored) on three prompts: a plain one, a
   chat-templated one and a Python function signature;
2. transformers loads the same GGUF (AutoModelForCausalLM.from_pretrained(dir, gguf_file=...,
   dtype=float32); needs `accelerate`) and generates the same 24 tokens: they must be identical;
   its AutoTokenizer must encode the prompts as citer's tokenizer does;
3. how many dequantized weights bfloat16 / float16 hold exactly;
4. `citer convert` writes the file as an HF folder (float32; --convert-dtype to change) under
   <cache>/hf/<name>, and citer on that folder must give the same tokens as on the GGUF.

Usage: python benchmarks/gguf_real_pair.py [--cache DIR] [--only 0.5b|1.5b] [--skip-transformers]
The converted folders live in the cache, never in the repository.
"""
import argparse
import gc
import json
import os
import shutil
import sys
import time

import torch

MODELS = {"0.5b": ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-0.5b-instruct"),
          "1.5b": ("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "qwen2.5-coder-1.5b-instruct")}
NEW_TOKENS = 24


def prompts(tok):
    chat = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that checks whether a "
                                     "number is prime."}], tokenize=False, add_generation_prompt=True)
    texts = {"plain": "The three most important things about writing clear code are",
             "chat": chat, "signature": "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"}
    return {k: tok(v, add_special_tokens=False).input_ids for k, v in texts.items()}


def citer_decode(path, ids):
    from citer import Engine, SamplingParams

    t0 = time.perf_counter()
    engine = Engine(slm=path, device="cpu", dtype="float32", max_model_len=256, kv_cache_memory=1 << 28)
    load = time.perf_counter() - t0
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, policy="slm", ignore_eos=True)
    outs = engine.generate(list(ids.values()), params)
    toks = {k: o.token_ids for k, o in zip(ids, outs)}
    texts = {k: o.text for k, o in zip(ids, outs)}
    del engine
    gc.collect()
    return load, toks, texts


def read_breakdown(path):
    """The parts of a GGUF load, timed apart (a fresh read: the cache is cleared first)."""
    from citer.engine.models import gguf as g
    from citer.engine.models import load_model
    from citer.pair_tokenizer import gguf_tokenizer

    g._cache.clear()
    t0 = time.perf_counter()
    g.read_gguf(path)
    t1 = time.perf_counter()
    model, _ = load_model(path)
    t2 = time.perf_counter()
    tok = gguf_tokenizer(path)
    t3 = time.perf_counter()
    del model
    gc.collect()
    return {"read_metadata_s": t1 - t0, "dequantize_into_model_s": t2 - t1, "tokenizer_s": t3 - t2}, tok


def exactness(path):
    """Share of dequantized weights that bfloat16 / float16 represent exactly."""
    from citer.engine.models.gguf import read_gguf

    ckpt = read_gguf(path)
    n = bf = hf = 0
    for name, t in ckpt.hf_tensors():
        n += t.numel()
        bf += int((t.to(torch.bfloat16).float() == t).sum())
        hf += int((t.to(torch.float16).float() == t).sum())
    return {"bfloat16_exact": bf / n, "float16_exact": hf / n, "weights": n}


def hf_decode(path, ids):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok_load = time.perf_counter() - t0
    toks = {}
    with torch.no_grad():
        for k, p in ids.items():
            out = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            toks[k] = out[0, len(p):].tolist()
    del model
    gc.collect()
    return load, tok_load, toks, tok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=os.environ.get("CITER_CACHE", os.path.expanduser("~/.cache/citer/real-pair")))
    ap.add_argument("--only", choices=list(MODELS))
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--convert-dtype", default="float32")
    args = ap.parse_args()
    from citer.convert import convert_gguf

    results = {}
    for key, (fname, hfname) in MODELS.items():
        if args.only and key != args.only:
            continue
        path = os.path.join(args.cache, fname)
        r = results[key] = {"gguf": path, "gguf_bytes": os.path.getsize(path)}
        r["breakdown"], tok = read_breakdown(path)
        ids = prompts(tok)
        r["prompt_lens"] = {k: len(v) for k, v in ids.items()}
        r["citer_load_s"], gtoks, texts = citer_decode(path, ids)  # file cached by now: model + tokenizer
        r["texts"] = texts
        print(f"[{key}] citer load breakdown {r['breakdown']}; Engine build (file read cached) "
              f"{r['citer_load_s']:.1f} s", flush=True)
        for k, v in texts.items():
            print(f"  {k}: {v!r}", flush=True)
        r.update(exactness(path))
        gc.collect()
        if not args.skip_transformers:
            r["hf_load_s"], r["hf_tokenizer_s"], htoks, htok = hf_decode(path, ids)
            r["tokens_equal_transformers"] = {k: gtoks[k] == htoks[k] for k in ids}
            r["first_diff"] = {k: next((i for i, (a, b) in enumerate(zip(gtoks[k], htoks[k])) if a != b), None)
                               for k in ids}
            r["prompt_ids_equal_autotokenizer"] = prompts(htok) == ids
            print(f"[{key}] transformers load {r['hf_load_s']:.1f} s; tokens equal {r['tokens_equal_transformers']}; "
                  f"AutoTokenizer ids equal {r['prompt_ids_equal_autotokenizer']}", flush=True)
        out = os.path.join(args.cache, "hf", hfname)
        if os.path.isdir(out):
            shutil.rmtree(out)
        summary = convert_gguf(path, out, dtype=args.convert_dtype)
        r["convert"] = {**summary, "folder": out,
                        "folder_bytes": sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))}
        gc.collect()
        t0 = time.perf_counter()
        _, ctoks, _ = citer_decode(out, ids)
        r["converted_load_s"] = time.perf_counter() - t0
        r["converted_tokens_equal_gguf"] = {k: ctoks[k] == gtoks[k] for k in ids}
        print(f"[{key}] convert {summary['seconds']:.1f} s -> {out} ({r['convert']['folder_bytes'] / 1e9:.2f} GB, "
              f"{summary['shards']} shard(s)); converted tokens equal GGUF's {r['converted_tokens_equal_gguf']}",
              flush=True)
        gc.collect()
    print(json.dumps(results, indent=1, default=str))
    with open(os.path.join(args.cache, "gguf_real_pair.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
