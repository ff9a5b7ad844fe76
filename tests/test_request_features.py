"""SamplingParams the ecosystem expects: n samples sharing the prompt's blocks, logprobs
from the model that made each token, min_tokens, include_stop_str_in_output,
skip_special_tokens; and the incremental detokenizer's guarantees."""
import random

import pytest
import torch

from citer import Engine, SamplingParams
from conftest import assert_all_free, random_prompts

BS = 4


@pytest.fixture(scope="module")
def engine(hf_models, router_path):
    return Engine(hf_models["qwen2"][0], hf_models["llama"][0], router_path, block_size=BS, num_blocks=200,
                  max_model_len=96)


def test_n_samples_share_the_prompt_blocks(engine):
    prompt = random_prompts(1, 11, 11, seed=1)[0]  # 2 full blocks before the last prompt token
    greedy = engine.generate([prompt], SamplingParams(max_tokens=6, policy="random", llm_fraction=0.3, seed=9,
                                                      ignore_eos=True))[0]
    outs = engine.generate([prompt], SamplingParams(n=3, max_tokens=6, policy="random", llm_fraction=0.3, seed=9,
                                                    ignore_eos=True))
    assert [o.index for o in outs] == [0, 1, 2] and outs[0].token_ids == greedy.token_ids
    for i, o in enumerate(outs):  # sample i is the request seeded with seed + i
        alone = engine.generate([prompt], SamplingParams(max_tokens=6, policy="random", llm_fraction=0.3,
                                                         seed=9 + i, ignore_eos=True))[0]
        assert o.token_ids == alone.token_ids and o.from_llm == alone.from_llm
    # the 8-token prefix is computed once (by both models: the policy may call the LLM)
    fwd = [o.stats["slm_forward_tokens"] for o in outs]
    assert fwd[0] == greedy.stats["slm_forward_tokens"] and fwd[1] == fwd[2] == fwd[0] - 8
    sampled = engine.generate([prompt], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=3, policy="slm",
                                                       ignore_eos=True))
    assert len({tuple(o.token_ids) for o in sampled}) > 1
    assert_all_free(engine)


def test_n_samples_share_blocks_in_the_page_table(engine):
    prompt = random_prompts(1, 9, 9, seed=2)[0]
    rid = engine.add_request(prompt, SamplingParams(n=3, max_tokens=4, policy="slm", ignore_eos=True))
    engine.step()
    seqs = [engine.core.get(f"{rid}#{i}") for i in range(3)]
    tables = [engine.block_manager.block_table(s.handle) for s in seqs]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2] and len({t[2] for t in tables}) == 3
    assert [engine.block_manager.ref_count(b) for b in tables[0][:2]] == [3, 3]
    events = []
    while engine.has_unfinished_requests():
        events += engine.step()
    assert sorted({ev.request_id for ev in events}) == [f"{rid}#{i}" for i in range(3)]
    assert engine.abort(rid) is None
    assert_all_free(engine)
    with pytest.raises(ValueError, match="n=65 samples exceed max_num_seqs=64"):
        engine.add_request(prompt, SamplingParams(n=65, max_tokens=2))


def test_aborting_a_request_aborts_every_sample(engine):
    rid = engine.add_request([5, 6, 7], SamplingParams(n=2, max_tokens=30, policy="slm", ignore_eos=True))
    engine.step()
    assert engine.abort(rid).finish_reason == "abort"
    assert_all_free(engine)


@pytest.mark.parametrize("gone", [0, 1])
def test_a_sample_aborted_while_its_group_waits(engine, gone):
    """Aborting one sample of an n=3 request before it is admitted: the other two run (sharing
    the prompt's blocks among themselves) as they would have, the request queued behind them
    runs, nothing is left running, every block comes back. (Admission once popped the queue's
    head once per sample: the request behind was dropped, the aborted sample ran forever.)"""
    prompt, sp = random_prompts(1, 11, 11, seed=4)[0], dict(max_tokens=5, policy="random", llm_fraction=0.3,
                                                            ignore_eos=True)
    ref = engine.generate([prompt], SamplingParams(n=3, seed=7, **sp))
    rid = engine.add_request(prompt, SamplingParams(n=3, seed=7, **sp))
    behind = engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, policy="slm", ignore_eos=True))
    assert engine.abort(f"{rid}#{gone}").finish_reason == "abort"
    outs = {}
    for _ in range(20):
        outs.update({ev.request_id: ev.output for ev in engine.step() if ev.output is not None})
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests() and outs[behind].finish_reason == "length"
    for i in {0, 1, 2} - {gone}:
        assert outs[f"{rid}#{i}"].token_ids == ref[i].token_ids
    assert_all_free(engine)


def test_an_n_request_frees_its_id_when_it_is_done(engine):
    """A finished n>1 request leaves nothing behind: its id can be used again (and aborted),
    and a server's table of such requests does not grow with each one."""
    sp = SamplingParams(n=2, max_tokens=2, temperature=1.0, policy="slm", ignore_eos=True)
    engine.add_request([5, 6, 7], sp, request_id="x")
    while engine.has_unfinished_requests():
        engine.step()
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=20, policy="slm", ignore_eos=True), request_id="x")
    engine.step()
    assert engine.abort(rid).finish_reason == "abort" and not engine.has_unfinished_requests()
    for _ in range(3):
        engine.generate([[5, 6, 7]], sp)
    rid = engine.add_request([5, 6, 7], SamplingParams(n=2, max_tokens=20, policy="slm", ignore_eos=True))
    engine.step()
    assert engine.abort(f"{rid}#0").finish_reason == "abort"
    assert engine.abort(rid).index == 1  # the samples still live; the first of them answers
    assert engine.core.requests.groups == {}
    assert_all_free(engine)


@pytest.mark.parametrize("params", [dict(policy="slm"), dict(policy="llm"), dict(policy="random", llm_fraction=0.5,
                                                                               seed=2),
                                    dict(policy="speculative")])
def test_logprobs_come_from_the_model_that_made_each_token(engine, hf_models, params):
    prompt = random_prompts(1, 6, 6, seed=3)[0]
    o = engine.generate([prompt], SamplingParams(max_tokens=8, logprobs=3, ignore_eos=True, **params))[0]
    seq = torch.tensor([prompt + o.token_ids])
    with torch.no_grad():
        ref = {m: torch.log_softmax(hf_models[m][1](seq).logits[0].float(), -1) for m in ("qwen2", "llama")}
    n = len(prompt)
    for t, (tok, lp, from_llm) in enumerate(zip(o.token_ids, o.logprobs, o.from_llm)):
        row = ref["llama" if from_llm else "qwen2"][n + t - 1]
        assert lp.token_id == tok and lp.logprob == pytest.approx(float(row[tok]), abs=1e-4)
        assert [i for i, _ in lp.top] == row.topk(3).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    plain = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True, **params))[0]
    assert plain.token_ids == o.token_ids and plain.logprobs is None


def test_min_tokens_holds_back_the_stops(engine):
    prompt = random_prompts(1, 5, 5, seed=4)[0]
    full = engine.generate([prompt], SamplingParams(max_tokens=20, policy="slm", ignore_eos=True))[0].token_ids
    stop = full[1]
    o = engine.generate([prompt], SamplingParams(max_tokens=20, policy="slm", stop_token_ids=[stop], min_tokens=6,
                                                 ignore_eos=True))[0]
    assert len(o.token_ids) >= 6 and stop not in o.token_ids[:6]  # banned until then
    assert o.finish_reason == "length" or o.token_ids[-1] == stop
    for policy in ("llm", "speculative"):
        o = engine.generate([prompt], SamplingParams(max_tokens=12, policy=policy, stop_token_ids=[stop],
                                                     min_tokens=5, ignore_eos=True))[0]
        assert len(o.token_ids) >= 5 and stop not in o.token_ids[:5]
    spec = engine.generate([prompt], SamplingParams(max_tokens=12, policy="speculative", min_tokens=5,
                                                    stop_token_ids=[stop], ignore_eos=True))[0]
    llm = engine.generate([prompt], SamplingParams(max_tokens=12, policy="llm", min_tokens=5,
                                                   stop_token_ids=[stop], ignore_eos=True))[0]
    assert spec.token_ids == llm.token_ids  # lossless with the ban too


@pytest.mark.parametrize("min_tokens", [3, 6])
def test_min_tokens_holds_back_stop_strings(engine, min_tokens):
    """A stop string ending in the text of the first min_tokens tokens never stops the request
    (vLLM's rule): the first match ending after it does, and cuts the text there. (The text
    made under min_tokens was once searched when it ran out: the request stopped at once on
    an early match, and the text lost its last token.)"""
    base = engine.generate("abc", SamplingParams(max_tokens=24, policy="slm", ignore_eos=True))[0]
    tok = engine.tokenizer
    early = len(tok.decode(base.token_ids[:min_tokens]))
    stop = base.text[0]  # in the early text, and maybe later
    o = engine.generate("abc", SamplingParams(max_tokens=24, policy="slm", ignore_eos=True, stop=[stop],
                                              min_tokens=min_tokens))[0]
    later = base.text.find(stop, early - len(stop) + 1)
    if later == -1:
        assert (o.finish_reason, o.text, o.token_ids) == ("length", base.text, base.token_ids)
    else:
        assert o.finish_reason == "stop" and o.text == base.text[:later] and len(o.token_ids) > min_tokens - 1
        assert o.token_ids == base.token_ids[:len(o.token_ids)]
    assert_all_free(engine)


def test_a_stop_tokens_text_is_left_out_unless_asked_for(engine):
    """As vLLM: the token that stops a request (a stop_token_ids one, or EOS shown with
    skip_special_tokens=False) stays in token_ids, its text only with include_stop_str_in_output."""
    tok = engine.tokenizer
    base = engine.generate("abc", SamplingParams(max_tokens=24, policy="slm", ignore_eos=True))[0]
    stop = next(t for t in base.token_ids[2:] if tok.decode([t]).strip())  # one with text of its own
    cut = engine.generate("abc", SamplingParams(max_tokens=24, policy="slm", ignore_eos=True, stop_token_ids=[stop]))[0]
    n = base.token_ids.index(stop) + 1
    assert cut.token_ids == base.token_ids[:n] and cut.finish_reason == "stop"
    assert cut.text == tok.decode(base.token_ids[:n - 1])
    kept = engine.generate("abc", SamplingParams(max_tokens=24, policy="slm", ignore_eos=True, stop_token_ids=[stop],
                                                 include_stop_str_in_output=True))[0]
    assert kept.token_ids == cut.token_ids and kept.text == tok.decode(base.token_ids[:n])
    streamed = "".join(ev.text for ev in _events(engine, "abc", SamplingParams(
        max_tokens=24, policy="slm", ignore_eos=True, stop_token_ids=[stop])))
    assert streamed == cut.text
    shown = SamplingParams(max_tokens=24, policy="slm", stop_token_ids=[stop], skip_special_tokens=False)
    o = engine.generate("abc", shown)[0]
    assert o.text == tok.decode(o.token_ids[:-1], skip_special_tokens=False)


def _events(engine, prompt, params):
    rid, events = engine.add_request(prompt, params), []
    while engine.has_unfinished_requests():
        events += [ev for ev in engine.step() if ev.request_id == rid]
    return events


def test_stop_string_in_output_and_special_tokens(engine):
    tok = engine.tokenizer
    base = engine.generate("abc", SamplingParams(max_tokens=24, policy="slm", ignore_eos=True))[0]
    stop = base.text[3:5]
    cut = engine.generate("abc", SamplingParams(max_tokens=24, policy="slm", ignore_eos=True, stop=[stop]))[0]
    kept = engine.generate("abc", SamplingParams(max_tokens=24, policy="slm", ignore_eos=True, stop=[stop],
                                                 include_stop_str_in_output=True))[0]
    assert kept.text == cut.text + stop and kept.token_ids == cut.token_ids
    special = tok.convert_tokens_to_ids("</s>")
    raw = [5, 6, special, 7]
    from citer.engine.detokenizer import Detokenizer
    from citer.engine.policies import SLMOnly
    from citer.engine.sequence import Sequence

    for skip in (True, False):
        seq = Sequence("x", [3], SamplingParams(skip_special_tokens=skip), SLMOnly(), 0, 4096)
        seq.token_ids += raw
        text = "".join(Detokenizer(tok).update(seq, 2 + i, finishing=i == 3)[0] for i in range(4))
        assert text == tok.decode(raw, skip_special_tokens=skip)
        # a stop string naming a special token fires only when special tokens are in the text
        seq = Sequence("y", [3], SamplingParams(skip_special_tokens=skip, stop=["</s>"]), SLMOnly(), 0, 4096)
        seq.token_ids += raw
        hits = [Detokenizer(tok).update(seq, 2 + i, finishing=False)[1] for i in range(4)]
        assert any(hits) == (not skip)


def test_incremental_detokenization_equals_a_full_decode(demo_tokenizer):
    """Random token streams (multi-byte characters split across tokens included): the
    deltas join to decode(all tokens), and no delta ends in half a character."""
    from citer.engine.detokenizer import Detokenizer
    from citer.engine.policies import SLMOnly
    from citer.engine.sequence import Sequence

    tok = demo_tokenizer
    detok = Detokenizer(tok)
    rng = random.Random(0)
    texts = ["Leo has 79 eggs. 3*11=33 → ünïcødé ✓ 日本語", "#### 49", "a  b\n\tc" * 3]
    for text in texts:
        ids = tok(text).input_ids
        for _ in range(3):
            cut = ids + [rng.randrange(len(tok)) for _ in range(5)]
            seq = Sequence("x", [0], SamplingParams(), SLMOnly(), 0, 4096)
            seq.token_ids += cut
            deltas = [detok.update(seq, 2 + i, finishing=i == len(cut) - 1)[0] for i in range(len(cut))]
            assert "".join(deltas) == tok.decode(cut, skip_special_tokens=True)
            assert all(not d.endswith("\ufffd") for d in deltas[:-1])


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import AutoTokenizer

    from citer.assets import default_paths

    return AutoTokenizer.from_pretrained(default_paths()[0])
