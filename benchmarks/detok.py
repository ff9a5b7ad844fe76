"""Detokenization cost per token at long outputs: citer's incremental detokenizer
(prefix / read offsets: a bounded window per token) vs re-decoding the whole output at
every token (what citer did before). The demo pair's tokenizer, random tokens.

  .venv/bin/python benchmarks/detok.py [--tokens 4096]
"""
import argparse
import random
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--stop", default="####", help="a stop string (held back and searched every token)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from citer import SamplingParams
    from citer.assets import default_paths
    from citer.engine.detokenizer import Detokenizer
    from citer.engine.policies import SLMOnly
    from citer.engine.sequence import Sequence

    tok = AutoTokenizer.from_pretrained(default_paths()[0])
    rng = random.Random(0)
    ids = [rng.randrange(1, len(tok)) for _ in range(args.tokens)]
    seq = Sequence("x", [1], SamplingParams(stop=["\x00never"]), SLMOnly(), 0, 1 << 20)
    seq.token_ids += ids
    detok = Detokenizer(tok)
    times = {"incremental (citer)": [], "full re-decode (before)": []}
    text = ""
    for i in range(len(ids)):
        t0 = time.perf_counter()
        text += detok.update(seq, 2 + i, finishing=i == len(ids) - 1)[0]
        times["incremental (citer)"].append(time.perf_counter() - t0)
    assert text == tok.decode(ids, skip_special_tokens=True)
    for i in range(len(ids)):  # the old way: the whole output decoded (and searched) at every token
        t0 = time.perf_counter()
        tok.decode(ids[:i + 1], skip_special_tokens=True).find(args.stop)
        times["full re-decode (before)"].append(time.perf_counter() - t0)
    print(f"{args.tokens} generated tokens, demo tokenizer ({len(tok)} tokens)")
    print(f"{'detokenizer':<26} {'total s':>8} {'us / token':>11} {'us / token, last 256':>21}")
    for name, ts in times.items():
        print(f"{name:<26} {sum(ts):>8.3f} {sum(ts) / len(ts) * 1e6:>11.1f} {sum(ts[-256:]) / 256 * 1e6:>21.1f}")

if __name__ == "__main__":
    main()
