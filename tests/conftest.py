"""Shared fixtures: tiny random-weight Hugging Face models saved to temp folders.

transformers is the reference: citer loads the same folders and must match it.
TRITON_INTERPRET=1 is set here (CPU only) before anything imports Triton kernels.
"""
import contextlib
import os
import string

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton-backend tests run
VOCAB = 128  # tokenizer below has 99 tokens; config vocab padded like real checkpoints


def make_tokenizer():
    """A character-level tokenizer (99 tokens) saved as tokenizer.json.

    It carries "<|endoftext|>" because transformers' Qwen2 tokenizer class adds that token
    when missing, and the Qwen2 SLM and Llama LLM of the tests must share one vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for c in string.printable[:95]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    vocab_end = len(vocab)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    assert len(fast) == vocab_end + 1
    return fast


MODEL_CONFIGS = {
    # Qwen2 with tied embeddings (attention biases): the usual SLM
    "qwen2": dict(arch="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # Llama with GQA and llama3 rope scaling: the usual LLM
    "llama": dict(arch="llama", hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Qwen3: q/k norms and an explicit head_dim that differs from hidden/heads
    "qwen3": dict(arch="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=True),
}


def build_hf_model(path, arch, seed=0, vocab_size=VOCAB, with_tokenizer=True, dtype=torch.float32,
                   init_std=0.2, **kw):
    """Build a random transformers model, save it (+ tokenizer) to path; -> the HF model (eval)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    cfg_cls, model_cls = classes[arch]
    kw.setdefault("max_position_embeddings", 512)
    # larger-than-default init makes logits spread out, so greedy choices are not near-ties
    cfg = cfg_cls(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  initializer_range=init_std, **kw)
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    if with_tokenizer:
        make_tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> (folder, transformers model) for each config in MODEL_CONFIGS."""
    out = {}
    for i, (name, conf) in enumerate(MODEL_CONFIGS.items()):
        conf = dict(conf)
        arch = conf.pop("arch")
        path = str(tmp_path_factory.mktemp(name))
        out[name] = (path, build_hf_model(path, arch, seed=i, **conf))
    return out


@pytest.fixture(scope="session")
def router_path(tmp_path_factory):
    """A router folder for the tiny SLMs (hidden 64), with non-trivial BatchNorm statistics
    so that folding is exercised."""
    from citer.research.router_nets import RouterMLP, save_router

    torch.manual_seed(0)
    r = RouterMLP(64)
    with torch.no_grad():
        bn = r.net[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    path = str(tmp_path_factory.mktemp("router"))
    save_router(r.eval(), path, default_threshold=0.5)
    return path


@pytest.fixture(scope="session")
def signal_router_path(tmp_path_factory):
    """A hidden+head router folder for the tiny SLMs (hidden 64): BatchNorm statistics and
    a last layer moved off their starting values, so both the MLP and the skip matter."""
    from citer.research.router_nets import RouterMLP, save_router

    torch.manual_seed(1)
    r = RouterMLP(64, features="hidden+head")
    with torch.no_grad():
        bn = r.net[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        r.net[-1].weight.normal_(0, 0.3)
        r.net[-1].bias.fill_(0.1)
        r.skip.weight.copy_(torch.tensor([[0.8, 0.1, -0.3]]))
    path = str(tmp_path_factory.mktemp("signal_router"))
    save_router(r.eval(), path, default_threshold=0.5)
    return path


def hf_greedy(model, prompt_ids, max_new_tokens):
    """transformers' own greedy generate (no EOS stop) -> new token ids."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, min_new_tokens=max_new_tokens)
    return out[0, len(prompt_ids):].tolist()


def random_prompts(n, lo, hi, seed=0, vocab=98):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (L,), generator=g).tolist() for L in lens]


def assert_all_free(engine):
    """Invariant 4: after any generate / abort / error, every KV block is free again."""
    bm = engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks
    assert not engine.has_unfinished_requests()


@contextlib.contextmanager
def serve_process(args=(), env=None, timeout: float = 90):
    """`citer serve` (the embedded pair) on a free loopback port, as a subprocess; -> its base
    URL once /health answers. Always terminated (killed if it does not stop) at the end."""
    import socket
    import subprocess
    import sys
    import time

    import httpx2 as httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "citer.cli", "serve", "--port", str(port), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"citer serve did not come up: {proc.stdout.read()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
