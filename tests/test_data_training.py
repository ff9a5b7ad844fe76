"""Router training on the user's own JSONL data, end to end on the tiny models: labels from
references (llm-agreement, CITER-S), from prompts alone (the LLM's own trajectories), the
teacher-forced positions cached so that a second run reads them instead of forwarding
again, the default τ by recall of validation disagreements, and the CLI's --data path."""
import json
import os

import pytest
import torch

from citer.engine.models.router import load_router
from citer.research.tasks.jsonl import JsonlTask
from citer.research.training import positions as P
from citer.research.training.forcing import Forcer
from citer.research.training.router_train import resolve_labels, train_router


def _write(path, lines):
    with open(path, "w") as f:
        for rec in lines:
            f.write(json.dumps(rec) + "\n")
    return str(path)


def _data(tmp_path, refs=True, n=24):
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    lines = []
    for i in range(n):
        rec = {"prompt": f"def f{i}(x):\n    '''{words[i % 6]} {i}'''\n", "id": str(i)}
        if refs:
            rec["reference"] = f"    return x + {i}\n"
        lines.append(rec)
    return _write(tmp_path / ("refs.jsonl" if refs else "prompts.jsonl"), lines)


def test_labels_follow_what_the_data_has(tmp_path, hf_models):
    tok = hf_models["qwen2"][0]
    with_refs = JsonlTask(data=_data(tmp_path), tokenizer=tok, checker="none")
    prompts_only = JsonlTask(data=_data(tmp_path, refs=False), tokenizer=tok, checker="none",
                             require_reference=False)
    assert resolve_labels("auto", False, with_refs) == ("gold", True)  # references, no checker: CITER-S
    assert resolve_labels("auto", False, prompts_only) == ("llm-agreement", False)
    assert resolve_labels("gold", False, with_refs) == ("gold", True)  # no checker: CITER-S, as --labels' help says
    with pytest.raises(ValueError, match="no checker"):
        train_router(tok, hf_models["llama"][0], with_refs, str(tmp_path / "r"), labels="gold")


def test_reference_ids_keep_the_prompts_own_ids():
    """A prompt ending in spaces that its reference's first word would take one of (Qwen2's split
    regex): the reference is the engine's prompt ids, then the reference's; elsewhere the joint
    tokenization, unchanged."""
    from citer.research.tasks import Problem
    from citer.research.tasks.bpe_tokenizer import train_tokenizer

    tok = train_tokenizer(["def add(a, b):\n    return a + b\n", "Tom has 3 apples."] * 20, vocab_size=300)
    cut = Problem("def add(a, b):\n    ", "return a + b\n", None)
    assert tok(cut.prompt + cut.solution).input_ids[:len(tok(cut.prompt).input_ids)] != tok(cut.prompt).input_ids
    full, start = P.reference_ids(tok, cut)
    assert full[:start] == tok(cut.prompt).input_ids and full[-1] == tok.eos_token_id
    assert tok.decode(full[:-1]) == cut.prompt + cut.solution
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spm = Tokenizer(models.BPE(unk_token="<unk>"))  # SentencePiece-style: the reference alone would gain a "▁"
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    spm.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    spm.train_from_iterator(["Answer: 42 and 17 is 59. The answer is 42."] * 50,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    spm = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    answer = Problem("Answer: ", "42", None)
    full, _ = P.reference_ids(spm, answer)
    assert spm.decode(full[:-1]) == "Answer: 42" and full[:-1] == spm(answer.prompt + answer.solution).input_ids
    whole = Problem("Tom has", " 3 apples.", None)
    full, start = P.reference_ids(tok, whole)
    assert full == tok(whole.prompt + whole.solution).input_ids + [tok.eos_token_id]
    assert start == len(tok(whole.prompt).input_ids)


def test_positions_equal_a_direct_teacher_forcing_and_are_cached(tmp_path, hf_models, monkeypatch):
    slm, llm = hf_models["qwen2"][0], hf_models["llama"][0]
    forcer = Forcer(slm, llm)
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]]
    starts = [3, 2]
    pos = P.force_positions(forcer, seqs, starts, gold=True, cache=str(tmp_path / "c"), chunk=1)
    full = forcer.run(seqs)
    want_h = torch.cat([f.hidden[s - 1:len(q) - 1] for f, q, s in zip(full, seqs, starts)])
    assert torch.allclose(pos.hidden, want_h, atol=1e-5)
    assert pos.gold.tolist() == [8, 9, 10, 13, 14]
    assert pos.llm_pred.tolist() == torch.cat([f.llm_pred[s - 1:len(q) - 1] for f, q, s in
                                               zip(full, seqs, starts)]).tolist()
    for name in ("slm_logp", "llm_logp"):  # each model's log-probability of the gold next token
        want = torch.cat([getattr(f, name + "_next")[s - 1:len(q) - 1] for f, q, s in zip(full, seqs, starts)])
        assert torch.allclose(getattr(pos, name), want, atol=1e-5) and (want < 0).all()
    old_format = sorted((tmp_path / "c").iterdir())[0]  # a chunk cached before the log-probabilities were kept
    torch.save({k: v for k, v in torch.load(old_format).items() if not k.endswith("_logp")}, old_format)
    redone = []
    real_force = P._force
    monkeypatch.setattr(P, "_force", lambda *a, **k: redone.append(1) or real_force(*a, **k))
    again = P.force_positions(forcer, seqs, starts, gold=True, cache=str(tmp_path / "c"), chunk=1)
    assert len(redone) == 1 and torch.equal(again.slm_logp, pos.slm_logp)  # that chunk redone and rewritten
    monkeypatch.setattr(P, "_force", lambda *a, **k: pytest.fail("recomputed a cached chunk"))
    again = P.force_positions(forcer, seqs, starts, gold=True, cache=str(tmp_path / "c"), chunk=1)
    assert torch.equal(again.hidden, pos.hidden)
    monkeypatch.setattr(P, "_force", real_force)  # another pair, same folder: its own positions, not these
    other = P.force_positions(Forcer(slm, slm), seqs, starts, gold=True, cache=str(tmp_path / "c"), chunk=1)
    assert torch.equal(other.slm_pred, other.llm_pred) and not torch.equal(other.llm_pred, pos.llm_pred)
    x, s, y, cases = P.labels_of(pos, "short-term")
    assert len(y) == 5 and cases["slm_right"] == int(y.sum())


@pytest.mark.parametrize("refs,labels,short", [(True, "llm-agreement", False), (True, "gold", True),
                                               (False, "llm-agreement", False)])
def test_training_end_to_end_on_a_toy_jsonl(tmp_path, hf_models, refs, labels, short):
    slm, llm = hf_models["qwen2"][0], hf_models["llama"][0]
    task = JsonlTask(data=_data(tmp_path, refs=refs), tokenizer=slm, checker="none", require_reference=refs)
    out = str(tmp_path / "router")
    m = train_router(slm, llm, task, out, rounds=2, n_train=12, n_val=4, labels=labels, short_term=short,
                     max_tokens=8, max_len=64, target_recall=0.8)
    r = load_router(out, 64)
    assert r.head_signals and m["default_threshold"]["rule"].startswith("recall")
    assert 0 <= m["default_threshold"]["llm_share_of_positions"] <= 1
    assert len(m["rounds"]) == (1 if short else 2)
    assert m["seconds"] > 0 and m["peak_rss_gb"] > 0
    # a second run reads every teacher-forced chunk from the cache
    calls = []
    real = P._force
    P._force = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        train_router(slm, llm, task, out, rounds=1, n_train=12, n_val=4, labels=labels, short_term=short,
                     max_tokens=8, max_len=64)
    finally:
        P._force = real
    assert not calls or not refs  # trajectories of the LLM are cached too; references certainly


def test_cli_train_router_with_data(tmp_path, hf_models):
    from citer.cli import main

    slm, llm = hf_models["qwen2"][0], hf_models["llama"][0]
    data = _data(tmp_path, refs=False)  # prompts only: the default --labels auto trains on the LLM's trajectories
    out = str(tmp_path / "cli_router")
    main(["train-router", "--slm", slm, "--llm", llm, "--data", data, "--out", out, "--n-train", "10",
          "--n-val", "3", "--rounds", "1", "--max-len", "64", "--max-tokens", "8", "--checker", "none"])
    assert os.path.isfile(os.path.join(out, "router_config.json"))


def test_baselines_on_data_and_their_eval(tmp_path, hf_models, router_path):
    """`citer train-baselines --data` (references, no checker): the query router and Co-LLM's
    head from the same cached positions; `citer eval --eval-data --baselines` then sweeps
    the Co-LLM head beside the routers."""
    from citer.cli import main

    slm, llm = hf_models["qwen2"][0], hf_models["llama"][0]
    out, cache = tmp_path / "baselines", tmp_path / "cache"
    args = ["train-baselines", "--slm", slm, "--llm", llm, "--data", _data(tmp_path), "--checker", "none",
            "--n-train", "12", "--max-len", "64", "--cache", str(cache), "--out", str(out)]
    assert main(args) == 0
    meta = json.loads((out / "colm" / "router_config.json").read_text())["meta"]
    assert meta["objective"] == "marginal likelihood" and meta["nll"] <= meta["nll_weak_init"]
    assert len(meta["sweep_taus"]) > 1 and (out / "query" / "config.json").is_file()
    load_router(str(out / "colm"), 64)
    toy = _write(tmp_path / "toy.jsonl", [{"prompt": f"Q: {i} + {i}? A:", "answer": str(2 * i), "stop": ["\n"]}
                                          for i in range(4)])
    ev = tmp_path / "eval"
    assert main(["eval", "--eval-data", toy, "--checker", "exact", "--slm", slm, "--llm", llm, "--router", router_path,
                 "--baselines", str(out), "--curves-only", "--no-oracle", "--shares", "0.1", "0.3",
                 "--max-tokens", "6", "--max-model-len", "96", "--out", str(ev)]) == 0
    rows = json.loads((ev / "eval.json").read_text())["rows"]
    assert sum(r["method"] == "Co-LLM" for r in rows) == 2 and any(r["method"] == "query-level" for r in rows)
    from citer.cli import _names_point

    citer = next(r for r in rows if r["method"] == "CITER")  # --timing names a point as the table prints it
    assert _names_point(f"CITER {citer['knob']:.4g}", citer) and _names_point(f"CITER {citer['knob']}", citer)
    assert not _names_point("CITER 0.1234567", citer) and not _names_point("confidence 0.5", citer)
    args = ["eval", "--eval-data", toy, "--checker", "exact", "--slm", slm, "--llm", llm, "--curves-only",
            "--no-oracle", "--max-tokens", "6", "--out", str(tmp_path / "eval2")]
    with pytest.raises(ValueError, match="none fits --max-model-len 8 with --max-tokens 6"):
        main(args + ["--max-model-len", "8"])
