"""Train the demo SLM/LLM pair (Qwen2 architecture) on a task, on CPU.

  python -m citer.research.training.lm --out runs/demo          # both models, then ship to assets
  python -m citer.research.training.lm --out runs/demo --only slm --minutes 5   # a pilot

Fresh problems every step, loss on the solution tokens only, AdamW with warm-up and
cosine decay, one CPU thread per model, seeded and resumable (ckpt.pt in each model's
folder is picked up again). Each model is saved as a Hugging Face folder (float16
safetensors + tokenizer) that transformers and citer both load.
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from citer.pair_tokenizer import save_tokenizer
from citer.research.tasks import get_task
from citer.research.tasks.bpe_tokenizer import train_tokenizer


@dataclass
class ModelSpec:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    steps: int
    lr: float
    batch_size: int = 32


SPECS = {
    "slm": ModelSpec(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     steps=4000, lr=3e-3),
    "llm": ModelSpec(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                     steps=6000, lr=3e-3),
}


def build_tokenizer(task, out: str, seed: int = 0):
    path = os.path.join(out, "tokenizer")
    from transformers import AutoTokenizer

    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(path)
    problems = task.train_problems(20000, np.random.default_rng(seed))
    tok = train_tokenizer(p.prompt + p.solution for p in problems)
    save_tokenizer(tok, path)
    return tok


def make_model(spec: ModelSpec, tok, max_len: int = 256):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                      num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                      num_key_value_heads=spec.num_attention_heads, max_position_embeddings=max_len,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return Qwen2ForCausalLM(cfg)


def encode_batch(tok, problems):
    """-> input_ids [B, L], labels [B, L] (-100 outside the solution + eos), attention mask."""
    rows, labels = [], []
    for p in problems:
        # encode the whole text once: the prompt's tokens are a prefix of it, exactly as
        # the engine sees the prompt at inference (the solution alone would lose its
        # leading space, which byte-level BPE merges into the first token)
        prompt = tok(p.prompt, add_special_tokens=False).input_ids
        full = tok(p.prompt + p.solution, add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert full[: len(prompt)] == prompt, "prompt tokens must be a prefix of prompt + solution"
        rows.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt):])
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), tok.pad_token_id)
    lab = torch.full((len(rows), L), -100)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(r)] = 1
    return ids, lab, mask


def lr_at(step: int, spec: ModelSpec, warmup: int = 100) -> float:
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, spec.steps - warmup)
    return spec.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def save_hf(model, tok, path: str, dtype=torch.float16):
    os.makedirs(path, exist_ok=True)
    model.to(dtype).save_pretrained(path)
    model.float()
    save_tokenizer(tok, path)


def quick_eval(path: str, task, n: int, seed: int = 1) -> float:
    from citer import Engine, SamplingParams
    from citer.research.evaluate import run_point

    # a validation sample from the training distribution (the test split is kept for the end)
    problems = task.train_problems(n, np.random.default_rng(10_000 + seed))
    engine = Engine(path, dtype="float32", max_model_len=256, max_num_seqs=n, num_blocks=n * 16 + 16)
    return run_point(engine, task, problems, SamplingParams(max_tokens=96))["accuracy"]


def train(name: str, spec: ModelSpec, task, tok, out: str, seed: int = 0, minutes: float = None,
          eval_every: int = 1000, eval_n: int = 200) -> str:
    torch.set_num_threads(1)
    path = os.path.join(out, name)
    ckpt = os.path.join(out, f"{name}.ckpt.pt")
    torch.manual_seed(seed)
    model = make_model(spec, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
    step, log = 0, []
    rng = np.random.default_rng(seed)
    if os.path.isfile(ckpt):
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        rng.bit_generator.state = state["rng"]
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.time()
    bar = tqdm(total=spec.steps, initial=step, desc=f"{name} ({n_params / 1e3:.0f}K params)")
    model.train()
    while step < spec.steps:
        if minutes is not None and time.time() - t0 > minutes * 60:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, spec)
        ids, lab, mask = encode_batch(tok, task.train_problems(spec.batch_size, rng))
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % eval_every == 0 or step == spec.steps:
            save_hf(model, tok, path, dtype=torch.float32)
            acc = quick_eval(path, task, eval_n)
            log.append({"step": step, "loss": loss.item(), "val_acc": acc, "seconds": time.time() - t0})
            tqdm.write(f"{name} step {step}: loss {loss.item():.3f} val acc {acc:.1%}")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log,
                        "rng": rng.bit_generator.state}, ckpt)
            model.train()
    bar.close()
    save_hf(model, tok, path, dtype=torch.float16)
    with open(os.path.join(path, "training_log.json"), "w") as f:
        json.dump({"spec": asdict(spec), "params": n_params, "log": log}, f, indent=1)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arith")
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", choices=list(SPECS))
    ap.add_argument("--minutes", type=float, default=None, help="stop each model after this long (pilots)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="override the spec's step count")
    ap.add_argument("--hidden-size", type=int, default=None, help="override the spec's hidden size")
    ap.add_argument("--intermediate-size", type=int, default=None, help="override the spec's MLP size")
    args = ap.parse_args()
    task = get_task(args.task)
    os.makedirs(args.out, exist_ok=True)
    tok = build_tokenizer(task, args.out, args.seed)
    for name in ([args.only] if args.only else list(SPECS)):
        spec = SPECS[name]
        if args.steps:
            spec.steps = args.steps
        if args.hidden_size:
            spec.hidden_size = args.hidden_size
        if args.intermediate_size:
            spec.intermediate_size = args.intermediate_size
        train(name, spec, task, tok, args.out, seed=args.seed, minutes=args.minutes)


if __name__ == "__main__":
    main()
