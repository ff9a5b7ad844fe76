"""`make demo`: routed decoding on the two embedded pairs.

For each task (arith, the default; then arith-free, whose solutions have interchangeable
choices) it solves a few held-out problems with CITER routing (the LLM's tokens
highlighted), then compares policy slm / llm / router (at the router's default τ) on
held-out problems: accuracy, share of tokens made by the LLM, wall-clock per token.
If the trained pair is not in this build, it says so and shows the mechanics on a tiny
random-weight pair built on the fly instead.
"""
import os
import string
import sys
import tempfile
import time

import torch

from . import Engine, SamplingParams
from .assets import shipped
from .engine.models.loader import num_parameters
from .engine.outputs import llm_share

BOLD, RESET = "\033[1;33m", "\033[0m"
SIZES = dict(max_model_len=256, max_num_seqs=256, num_blocks=256 * 16)  # batch a whole evaluation


def highlight(engine, out) -> str:
    """Generated text with the LLM's tokens in bold yellow."""
    if engine.tokenizer is None:
        return " ".join(f"{BOLD}{t}{RESET}" if llm else str(t) for t, llm in zip(out.token_ids, out.from_llm))
    pieces = []
    for tok, llm in zip(out.token_ids, out.from_llm):
        s = engine.tokenizer.decode([tok], skip_special_tokens=True)
        pieces.append(f"{BOLD}{s}{RESET}" if llm and s else s)
    return "".join(pieces)


def trained_demo(engine: Engine, task_name: str, n_eval: int, n_show: int) -> None:
    from citer.research.evaluate import run_point
    from citer.research.tasks import get_task

    task = get_task(task_name)
    tau = engine.router.default_threshold
    print(f"== task {task_name}: the pair in {os.path.dirname(engine.paths['slm'])} "
          f"(CITER router, features {engine.router.features}, at its default τ={tau:g})")
    print(f"tokens the LLM made are {BOLD}bold yellow{RESET}\n")
    problems = task.test_problems(n_eval)
    shown = problems[:n_show]
    outs = engine.generate([p.prompt for p in shown], SamplingParams(max_tokens=128, policy="router"))
    for p, o in zip(shown, outs):
        mark = "right" if task.check(o.text, p) else f"wrong (gold {p.answer})"
        print(f"{p.prompt}\n  ->{highlight(engine, o)}   [{mark}; LLM made {o.llm_share:.0%} of the tokens]\n")
    rows = []
    for policy in ("slm", "llm", "router"):
        r = run_point(engine, task, problems, SamplingParams(max_tokens=128, policy=policy))
        rows.append((policy, r))
    print(f"{n_eval} held-out {task_name} problems, greedy, batched:")
    print(f"{'policy':<16} {'accuracy':>9} {'LLM share':>10} {'ms/token':>9}")
    for policy, r in rows:
        label = f"router (τ={tau:g})" if policy == "router" else policy
        print(f"{label:<16} {r['accuracy']:>9.1%} {r['llm_share']:>10.1%} {r['ms_per_token']:>9.3f}")
    bm = engine.block_manager
    print(f"KV blocks free after all requests: {bm.num_free_blocks}/{bm.num_blocks}\n")


def _random_pair(root: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 3}
    for c in string.printable[:95]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|endoftext|>"])
    paths = []
    for name, hidden, layers in (("slm", 64, 2), ("llm", 192, 4)):
        cfg = Qwen2Config(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=512, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
        torch.manual_seed(len(paths))
        path = f"{root}/{name}"
        Qwen2ForCausalLM(cfg).save_pretrained(path)
        fast.save_pretrained(path)
        paths.append(path)
    return paths


def mechanics_demo(engine: Engine) -> None:
    prompts = ["Tom has 12 apples.", "3+4=", "Routing tokens"]
    rows = []
    for policy, extra in (("slm", {}), ("llm", {}), ("random", {"llm_fraction": 0.3, "seed": 0}),
                          ("confidence", {"confidence_threshold": 0.2})):
        outs = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True, policy=policy, **extra))
        print(f"policy={policy}")
        for p, o in zip(prompts, outs):
            print(f"  {p!r} -> {highlight(engine, o)}")
        rows.append((policy, llm_share(outs),
                     sum(o.stats["slm_forward_tokens"] for o in outs), sum(o.stats["llm_forward_tokens"] for o in outs)))
    print(f"\n{'policy':<12} {'LLM share':>9} {'SLM fwd tokens':>15} {'LLM fwd tokens':>15}")
    for r in rows:
        print(f"{r[0]:<12} {r[1]:>9.1%} {r[2]:>15} {r[3]:>15}")


def main() -> int:
    t0 = time.time()
    try:
        engine = Engine(**SIZES)
    except FileNotFoundError as e:
        print(f"NOTE: {e}.\nThe trained demo pair is not in this build, so this demo builds a tiny RANDOM-WEIGHT "
              "Qwen2 pair on the fly: its text is gibberish; it shows the routing mechanics, not answer quality.\n")
        slm, llm = _random_pair(tempfile.mkdtemp(prefix="citer-demo-"))
        engine = Engine(slm, llm, max_model_len=256, num_blocks=64)
        mechanics_demo(engine)
        bm = engine.block_manager
        print(f"\nKV blocks free after all requests: {bm.num_free_blocks}/{bm.num_blocks}")
    else:
        print("citer demo: the embedded default pair, Engine() with no arguments")
        trained_demo(engine, "arith", n_eval=200, n_show=4)
        try:
            free = shipped("arith-free")
        except FileNotFoundError as e:
            print(f"(no second pair: {e})")
        else:
            # the second embedded pair: a task whose solutions have interchangeable choices
            engine = Engine(free["slm"], free["llm"], free["router"], **SIZES)
            trained_demo(engine, "arith-free", n_eval=100, n_show=2)
        sizes = " and ".join(f"{num_parameters(engine.paths[m]) / 1e3:.0f}K" for m in ("slm", "llm"))
        print(f"(ms/token: the demo's models have {sizes} parameters, so each step's fixed cost, not the models, "
              "sets these times;\n speed at model sizes that matter: benchmarks/routed_decoding.py and BENCHMARKS.md)")
    print(f"{time.time() - t0:.0f} s; accuracy vs LLM share against every baseline: docs/demo-pair.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
