"""GGUF checkpoints: tiny random models written as llama.cpp's converter writes them (F32, F16,
a mix of block quant types), read back by citer, converted back to HF folders by `citer convert`.

The conftest tokenizer is character-level; transformers rebuilds a GGUF tokenizer as byte-level
BPE, so its ids round-trip but its vocabulary is spelled differently (" " becomes "Ġ"). The
GGUF SLM + HF LLM pair therefore uses a small byte-level BPE tokenizer trained here, as real
checkpoints have."""
import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from citer.engine.models import gguf as citer_gguf
from citer.engine.models import load_model, load_model_config
from citer.engine.models.loader import load_state
from citer.research.gguf_export import _llama3_rope_freqs, gguf_name, write_gguf
from conftest import MODEL_CONFIGS, build_hf_model, hf_greedy, make_tokenizer, random_prompts
from test_models import paged_forward

CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
# The conftest tokenizer has no merges, and the byte-level one below a GPT-2 split in a qwen2
# file: transformers before 5.24 (4.51-5.17 checked) need merges, and 4.x picks the split by
# architecture, so they cannot rebuild these synthetic ones. Real checkpoints are fine (Qwen2.5-Coder GGUFs checked against their HF
# tokenizer under 4.51.3, 4.57.6, 5.17.0 and 5.24.0). These tests need 5.24's reader.
NEEDS_NEW_GGUF_READER = pytest.mark.skipif(
    tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 24),
    reason="transformers < 5.24 cannot rebuild the tests' merge-less GGUF tokenizers")
TEXTS = ["hello world", "def f(x):\n    return x + 1\n", "Tom has 3 apples.</s><|endoftext|>", "  two  spaces"]

@pytest.fixture(scope="module")
def ggufs(hf_models, tmp_path_factory):
    """name -> {"F32": path, "F16": path} for each conftest model, with the conftest tokenizer."""
    tok = make_tokenizer()
    tok.chat_template = CHAT
    out = {}
    for name, (_, hf) in hf_models.items():
        d = tmp_path_factory.mktemp(f"gguf_{name}")
        arch = MODEL_CONFIGS[name]["arch"]
        out[name] = {f: write_gguf(d / f"{name}-{f}.gguf", hf, arch, getattr(Q, f), tok) for f in ("F32", "F16")}
    return out


def _logits(path, prompts, round_to=None):
    model, cfg = load_model(path, max_positions=512)
    if round_to is not None:  # the source model with its 2-D weights as the GGUF stores them
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.copy_(round_to(p))
    return paged_forward(model, cfg, prompts, [0, 3, len(prompts[2]) - 1])


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_config_and_f32_logits_equal_the_hf_folder(hf_models, ggufs, name):
    path, hf = hf_models[name]
    assert load_model_config(ggufs[name]["F32"]) == load_model_config(path)  # rope, biases, tying, eos, bos
    prompts = random_prompts(3, 5, 30, seed=1)
    ours = _logits(ggufs[name]["F32"], prompts)
    assert torch.equal(ours, _logits(path, prompts))
    with torch.no_grad():  # and so transformers' own, as test_models checks for the folder
        ref = hf(torch.tensor([prompts[0]])).logits[0]
    assert (ours[:len(prompts[0])] - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_f16_logits_are_the_source_model_rounded_to_f16(hf_models, ggufs, name):
    path, _ = hf_models[name]
    prompts = random_prompts(3, 5, 30, seed=2)
    ours = _logits(ggufs[name]["F16"], prompts)
    assert torch.equal(ours, _logits(path, prompts, round_to=lambda p: p.half().float()))
    exact = _logits(path, prompts)
    assert (ours - exact).abs().max() <= 1e-2 * exact.abs().max()


def test_block_quant_types_dequantize_like_gguf(tmp_path, hf_models):
    """A mix of block types as in a real Q4_K_M file (Q8_0, Q5_0, Q4_0, Q4_1; the K-quants need
    rows of 256): citer's model holds exactly gguf.quants' dequantized values."""
    path, hf = hf_models["qwen2"]
    kinds = [Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q4_1]
    names = [gguf_name(n) for n, t in hf.state_dict().items() if t.ndim == 2 and n != "lm_head.weight"]
    qtypes = {n: kinds[i % len(kinds)] for i, n in enumerate(names)}
    g = write_gguf(tmp_path / "q.gguf", hf, "qwen2", tokenizer=None, qtypes=qtypes)
    assert {t.tensor_type for t in gguf.GGUFReader(g).tensors} == {Q.F32, *kinds}
    want = {}  # HF name -> the values the file holds
    for n, t in hf.state_dict().items():
        q = qtypes.get(gguf_name(n))
        if q is not None:
            want[n] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), q), q)).reshape(t.shape)
    got = dict(citer_gguf.read_gguf(g).hf_tensors())
    assert all(torch.equal(got[n], want[n]) for n in want)
    ref, cfg = load_model(path, max_positions=512)  # the source model holding those values
    load_state(ref, ((n, want.get(n, t)) for n, t in hf.state_dict().items() if n != "lm_head.weight"))  # tied
    prompts = random_prompts(3, 5, 30, seed=3)
    assert torch.equal(_logits(g, prompts), paged_forward(ref, cfg, prompts, [0, 3, len(prompts[2]) - 1]))


@NEEDS_NEW_GGUF_READER
@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_greedy_tokens_equal_transformers(hf_models, ggufs, name):
    from citer import Engine, SamplingParams

    _, hf = hf_models[name]
    engine = Engine(slm=ggufs[name]["F32"], num_blocks=64, max_model_len=128)
    prompts = random_prompts(2, 4, 12, seed=4)
    outs = engine.generate(prompts, SamplingParams(max_tokens=10, policy="slm", ignore_eos=True))
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 10) for p in prompts]


@NEEDS_NEW_GGUF_READER
def test_conftest_tokenizer_round_trips_through_gguf(ggufs):
    """ids, text, special tokens and chat template; only the spelling of the vocabulary differs
    (transformers rebuilds a GGUF tokenizer as byte-level BPE)."""
    from transformers import AutoTokenizer

    from citer.pair_tokenizer import load_tokenizer

    src = make_tokenizer()
    ours = load_tokenizer(ggufs["qwen2"]["F32"])
    folder, fname = os.path.split(ggufs["qwen2"]["F32"])
    auto = AutoTokenizer.from_pretrained(folder, gguf_file=fname)  # what transformers itself builds
    for text in TEXTS:
        ids = src(text).input_ids
        assert ours(text).input_ids == ids == auto(text).input_ids
        assert ours.decode(ids) == src.decode(ids) == auto.decode(ids)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, attr) == getattr(src, attr)
    assert ours.chat_template == CHAT == auto.chat_template


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: pad, bos, eos of build_hf_model


def byte_level_tokenizer():
    """A small byte-level BPE (256 byte symbols + merges + specials), like real checkpoints'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["def add(a, b):\n    return a + b\n", "Tom has 3 apples and buys 4 more.", "the cat sat on the mat"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=SPECIALS[0], bos_token=SPECIALS[1],
                                   eos_token=SPECIALS[2], chat_template=CHAT)


def qwen_pipeline_gguf(tmp_path):
    """-> (tokenizer, HF model, GGUF path): a tokenizer with Qwen2's pipeline and added tokens,
    control (<|im_start|>) and user-defined (<think>), written into a Qwen2 GGUF as llama.cpp's
    converter writes it."""
    from citer.research.tasks.bpe_tokenizer import train_tokenizer

    corpus = ["def add(a, b):\n    return a + b\n\n\n", "Tom has 3 apples and buys 42 more.", "café  crème"] * 20
    tok = train_tokenizer(corpus, vocab_size=330)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<think>"])
    tok.chat_template = CHAT
    conf = {k: v for k, v in MODEL_CONFIGS["qwen2"].items() if k != "arch"}
    # 1100 ids: past citer's _BIG_ARRAY, so the vocabulary is not kept in the metadata, as with real files
    hf = build_hf_model(str(tmp_path / "m"), "qwen2", vocab_size=1100, with_tokenizer=False, **conf)
    return tok, hf, write_gguf(tmp_path / "q.gguf", hf, "qwen2", Q.F32, tok)


def test_qwen2_tokenizer_round_trips_through_gguf(tmp_path):
    """A tokenizer with Qwen2's pipeline (its split regex, NFC, byte-level BPE) and added tokens,
    control (<|im_start|>) and user-defined (<think>), as Qwen checkpoints have: written as
    llama.cpp's converter writes it (pre "qwen2", token types 3 and 4) and read back, it splits
    newlines, spaces and digits and matches added tokens whole exactly as the source does."""
    from citer.pair_tokenizer import PORTABLE, load_tokenizer

    tok, hf, fn = qwen_pipeline_gguf(tmp_path)
    ckpt = citer_gguf.read_gguf(str(fn))
    assert ckpt.metadata["tokenizer.ggml.pre"] == "qwen2" and "tokenizer.ggml.tokens" not in ckpt.metadata
    assert dict(ckpt.added_tokens) == {"<|endoftext|>": True, "<|im_start|>": True, "<|im_end|>": True, "<think>": False}
    types = gguf.GGUFReader(str(fn)).fields["tokenizer.ggml.token_type"].contents()
    assert types[tok.convert_tokens_to_ids("Ġ")] == 1 and set(types[len(tok):]) == {5}  # normal; unused padding
    ours = load_tokenizer(str(fn))
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    texts = TEXTS + ["def add(a, b):\n    return a + b\n\n\n", "x = 123456  # café", "<|im_start|>user\nhi<think>ok"
                     "<|im_end|>", tok.apply_chat_template([{"role": "user", "content": "3 + 4"}], tokenize=False,
                                                           add_generation_prompt=True)]
    for text in texts:
        ids = tok(text).input_ids
        assert ours(text).input_ids == ids, text
        assert ours.decode(ids) == tok.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    from transformers import AutoConfig, AutoTokenizer

    from citer.cli import main

    assert main(["convert", str(fn), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0  # and as an HF folder
    folder = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text()).items() >= PORTABLE.items()
    assert [folder(t).input_ids for t in texts] == [tok(t).input_ids for t in texts]
    cfg = AutoConfig.from_pretrained(tmp_path / "hf")
    assert str(getattr(cfg, "dtype", None) or cfg.torch_dtype).endswith("bfloat16")  # `dtype` from 5, `torch_dtype` in 4
    from citer import Engine, SamplingParams

    engine = Engine(slm=str(fn), num_blocks=32, max_model_len=128)  # text in, through the GGUF's own tokenizer
    prompt = texts[-1]
    out = engine.generate([prompt], SamplingParams(max_tokens=8, policy="slm", ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf, tok(prompt).input_ids, 8)


@pytest.mark.parametrize("reader", ["5.17", "4.x"])
def test_gguf_tokenizer_mends_what_transformers_readers_get_wrong(tmp_path, monkeypatch, reader):
    """Whatever transformers is installed, the GGUF tokenizer splits text as the source tokenizer
    (and llama.cpp) does. Two readers' faults are put on the installed one here:
    - "5.17": it makes "<s>"/"</s>" added special tokens of a Qwen2 file: "</s>" in text became
      one token past the vocabulary (on Qwen2.5, whose vocabulary holds "</s>" as a plain
      token, that token matched whole); here a plain vocabulary token is made special too.
      Tokens the file does not mark whole are taken back.
    - "4.x": it leaves USER_DEFINED tokens (<think>) out, so they are cut into pieces, and
      names no bos/eos/pad. They are added back and named from the file's ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from citer.pair_tokenizer import load_tokenizer

    tok, _, fn = qwen_pipeline_gguf(tmp_path)
    plain = next(t for t in ("pp", "ap", "pl") if t in tok.get_vocab() and t not in tok.get_added_vocab())
    real = PreTrainedTokenizerFast.from_pretrained.__func__

    def faulty(cls, *args, **kwargs):
        t = real(cls, *args, **kwargs)
        if reader == "5.17":
            t.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": [plain]})
        else:
            state = json.loads(t.backend_tokenizer.to_str())
            state["added_tokens"] = [a for a in state["added_tokens"] if a["content"] != "<think>"]
            t._tokenizer = Tokenizer.from_str(json.dumps(state))
            t.bos_token = t.eos_token = t.pad_token = None
            assert t("<think>").input_ids != tok("<think>").input_ids  # the fault is in place
        return t

    monkeypatch.setattr(PreTrainedTokenizerFast, "from_pretrained", classmethod(faulty))
    ours = load_tokenizer(str(fn))
    assert ours.get_added_vocab() == tok.get_added_vocab()
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    for text in ["Tom has 3 apples.</s><|endoftext|>", "<s>happy apples</s>", "<|im_start|>user\n<s>hi<think>"]:
        assert ours(text).input_ids == tok(text).input_ids, text
        assert ours.decode(tok(text).input_ids) == tok.decode(tok(text).input_ids)
        assert (ours.decode(tok(text).input_ids, skip_special_tokens=True)
                == tok.decode(tok(text).input_ids, skip_special_tokens=True))


@NEEDS_NEW_GGUF_READER
def test_engine_runs_a_gguf_slm_with_an_hf_llm(tmp_path, router_path):
    """Token-level routing needs one vocabulary: the GGUF's (padded with [PAD<id>] to the
    embedding's 320 rows) and the HF folder's (300 tokens) are the same tokenizer."""
    from transformers import AutoTokenizer

    from citer import Engine, SamplingParams

    tok = byte_level_tokenizer()
    conf = {k: v for k, v in MODEL_CONFIGS["qwen2"].items() if k != "arch"}
    slm_hf = build_hf_model(str(tmp_path / "slm"), "qwen2", vocab_size=320, with_tokenizer=False, **conf)
    slm = write_gguf(tmp_path / "slm.gguf", slm_hf, "qwen2", Q.F16, tok)
    conf = {k: v for k, v in MODEL_CONFIGS["llama"].items() if k != "arch"}
    llm_hf = build_hf_model(str(tmp_path / "llm"), "llama", seed=1, vocab_size=320, with_tokenizer=False, **conf)
    tok.save_pretrained(tmp_path / "llm")
    engine = Engine(slm=slm, llm=str(tmp_path / "llm"), router=router_path, num_blocks=128, max_model_len=128)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "llm")
    auto = AutoTokenizer.from_pretrained(tmp_path, gguf_file="slm.gguf")
    for text in TEXTS:
        assert engine.tokenizer(text).input_ids == hf_tok(text).input_ids == auto(text).input_ids
    prompts = ["def add(a, b):", "Tom has 3 apples"]
    ids = [hf_tok(p).input_ids for p in prompts]
    outs = {policy: engine.generate(prompts, SamplingParams(max_tokens=8, policy=policy, ignore_eos=True))
            for policy in ("router", "slm", "llm")}
    assert [o.token_ids for o in outs["llm"]] == [hf_greedy(llm_hf, p, 8) for p in ids]
    slm_f16 = build_hf_model(str(tmp_path / "slm16"), "qwen2", vocab_size=320, with_tokenizer=False, **dict(
        {k: v for k, v in MODEL_CONFIGS["qwen2"].items() if k != "arch"}))
    with torch.no_grad():  # the SLM as the F16 file holds it
        for p in slm_f16.parameters():
            p.copy_(p.half().float() if p.ndim == 2 else p)
    assert [o.token_ids for o in outs["slm"]] == [hf_greedy(slm_f16, p, 8) for p in ids]
    assert [engine.tokenizer.decode([i]) for i in range(300)] == [hf_tok.decode([i]) for i in range(300)]
    assert all(len(o.token_ids) == 8 and o.router_scores for o in outs["router"])


@NEEDS_NEW_GGUF_READER
@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_citer_convert_round_trip(tmp_path, hf_models, ggufs, name):
    """`citer convert` -> an HF folder (sharded here) that citer loads with the GGUF's logits and
    transformers with the source model's, with the tokenizer and the EOS ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from citer.cli import main

    src = ggufs[name]["F32"]
    out = tmp_path / "hf"
    assert main(["convert", src, str(out), "--max-shard-gb", "0.0002"]) == 0  # ~200 KB shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2]
    prompts = random_prompts(3, 5, 30, seed=5)
    assert torch.equal(_logits(str(out), prompts), _logits(src, prompts))
    theirs = AutoModelForCausalLM.from_pretrained(out).float().eval()
    x = torch.tensor([prompts[0]])
    with torch.no_grad():
        ref, got = hf_models[name][1](x).logits, theirs(x).logits
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    tok = AutoTokenizer.from_pretrained(out)
    assert [tok(t).input_ids for t in TEXTS] == [make_tokenizer()(t).input_ids for t in TEXTS]
    assert tok.chat_template == CHAT
    with pytest.raises(ValueError, match="not empty"):
        main(["convert", src, str(out)])
    shutil.rmtree(out)
    main(["convert", src, str(out), "--dtype", "bfloat16"])  # one file, bfloat16
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_unsupported_architecture_and_quant_type_are_named(tmp_path, hf_models):
    _, hf = hf_models["qwen2"]
    g = write_gguf(tmp_path / "gpt2.gguf", hf, "qwen2", arch_name="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'.*qwen2, qwen3, llama"):
        load_model_config(g)
    g = write_gguf(tmp_path / "q81.gguf", hf, "qwen2", qtypes={"blk.1.ffn_up.weight": Q.Q8_1})
    with pytest.raises(ValueError, match="'blk.1.ffn_up.weight'.*quant type Q8_1.*Q4_K"):
        load_model(g)


@NEEDS_NEW_GGUF_READER
def test_paths_and_one_read_per_file(tmp_path, ggufs, monkeypatch):
    """A folder with one .gguf (and no safetensors) is a GGUF checkpoint; the file is read once
    for the config, the weights and the tokenizer of an Engine."""
    from citer import Engine

    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(ggufs["qwen2"]["F32"], folder / "model.gguf")
    reads = []
    real = citer_gguf._read
    monkeypatch.setattr(citer_gguf, "_read", lambda fn: reads.append(fn) or real(fn))
    Engine(slm=str(folder), num_blocks=16, max_model_len=64)
    assert reads == [str(folder / "model.gguf")]
    assert load_model_config(str(folder)) == load_model_config(ggufs["qwen2"]["F32"])
    shutil.copy(ggufs["qwen2"]["F16"], folder / "other.gguf")
    with pytest.raises(ValueError, match="2 GGUF files.*model.gguf, other.gguf"):
        load_model_config(str(folder))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model_config(str(tmp_path / "nope.gguf"))


def test_llama3_rope_factors_read_back():
    """rope_freqs of real Llama 3.1 / 3.2 shapes give back the parameters they were made from."""
    for factor, head_dim, theta in ((8.0, 128, 500000.0), (32.0, 64, 500000.0)):
        rope = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
        got = citer_gguf.llama3_from_freq_factors(_llama3_rope_freqs(rope, theta, head_dim).astype(np.float64),
                                                  theta, head_dim)
        assert got == rope
    assert citer_gguf.llama3_from_freq_factors(np.ones(64), 500000.0, 128) is None
    assert citer_gguf.llama3_from_freq_factors(np.linspace(1, 3, 64), 500000.0, 128) == "unknown"


def test_added_tokens_survive_odd_files():
    """A CONTROL/USER_DEFINED/UNKNOWN token that is not UTF-8, or a token_type array longer than the
    vocabulary, must not stop a GGUF file loading (its weights need neither)."""
    from types import SimpleNamespace

    def field(values):  # gguf.ReaderField's layout: data indexes the parts holding each value
        return SimpleNamespace(parts=list(values), data=list(range(len(values))))

    tokens = field([np.frombuffer(t, dtype=np.uint8) for t in (b"a", b"<|im_start|>", b"\xff<bad>", b"<think>", b"<unk>")])
    types = field([np.array([t], dtype=np.int32) for t in (1, 3, 3, 4, 2, 3)])  # one type past the vocabulary
    got = citer_gguf._added_tokens({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types})
    # UNKNOWN (2) is special, as llama.cpp matches CONTROL, USER_DEFINED and UNKNOWN tokens whole
    assert got == (("<|im_start|>", True), ("\ufffd<bad>", True), ("<think>", False), ("<unk>", True))
    assert citer_gguf._added_tokens({"tokenizer.ggml.tokens": tokens}) == ()
