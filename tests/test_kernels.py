"""Each Triton kernel against its torch reference, under TRITON_INTERPRET=1 on CPU (and
compiled for real on a GPU): fresh random inputs, permuted block tables, ragged lengths,
non-power-of-two sizes, GQA, fp32 / fp16 / bf16 (bf16 compared with the reference run in
fp32 on the same bf16 values: the interpreter computes bf16 in fp32 and truncates)."""
import os

import torch

if not torch.cuda.is_available():  # before anything defines @triton.jit kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from citer.kernels.kv_store import store_kvcache_ref, store_kvcache_triton  # noqa: E402
from citer.kernels.paged_attention import SPLIT_KV_MAX_Q, paged_attention_ref, paged_attention_triton  # noqa: E402
from citer.kernels.rmsnorm import rms_norm_ref, rms_norm_triton  # noqa: E402
from citer.engine.models.router import RouterParams  # noqa: E402
from citer.kernels.routed_head import (head_signals_ref, router_mlp_ref, routed_head_ref,  # noqa: E402
                                      routed_head_triton)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rand(*shape, dtype=torch.float32, g=None, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def as_ref_dtype(t, dtype):
    """The reference's input: bf16 values computed in fp32 (see the module docstring)."""
    return t.float() if (t is not None and dtype == torch.bfloat16) else t


# ---------------------------------------------------------------------------------------
# KV store
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_store_kvcache(dtype, slot_dtype):
    g = torch.Generator().manual_seed(0)
    nb, bs, hkv, d = 7, 6, 3, 40  # Hkv * D = 120 and block_size 6: not powers of two
    kc = torch.zeros(nb, bs, hkv, d, dtype=dtype, device=DEV)
    vc = torch.zeros(nb, bs, hkv, d, dtype=dtype, device=DEV)
    kr, vr = kc.clone(), vc.clone()
    slots = torch.randperm(nb * bs, generator=g)[:13]
    slots[[2, 7]] = -1  # padded lanes
    slots = slots.to(slot_dtype).to(DEV)
    qkv = rand(13, 2 * hkv * d + 5, dtype=dtype, g=g)  # key/value as strided views, like the model's
    key = qkv[:, : hkv * d].view(13, hkv, d)
    value = qkv[:, hkv * d: 2 * hkv * d].view(13, hkv, d)
    store_kvcache_triton(key, value, kc, vc, slots)
    store_kvcache_ref(key, value, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    assert int((kc != 0).flatten(2).any(-1).sum()) == 11  # exactly the 11 valid slots written


# ---------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    g = torch.Generator().manual_seed(1)
    big = rand(5, 80, dtype=dtype, g=g)
    x, w = big[:, :72], rand(72, dtype=dtype, g=g)  # hidden 72; x rows strided
    r = rand(5, 72, dtype=dtype, g=g) if with_residual else None
    out, res = rms_norm_triton(x, w, 1e-6, r)
    ref, ref_res = rms_norm_ref(as_ref_dtype(x, dtype), as_ref_dtype(w, dtype), 1e-6, as_ref_dtype(r, dtype))
    tol = TOL[dtype] * 10
    assert out.dtype == dtype and out.shape == (5, 72)
    assert torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol)
    if with_residual:
        assert torch.allclose(res.float(), ref_res.float(), atol=tol, rtol=tol)
    else:
        assert res is None
    if dtype != torch.bfloat16:  # fp32 / fp16: the same roundings as torch
        ref_same, ref_res_same = rms_norm_ref(x, w, 1e-6, r)
        assert torch.allclose(out, ref_same, atol=1e-6 if dtype == torch.float32 else 1e-3, rtol=1e-5)
        if with_residual:
            assert torch.equal(res, ref_res_same)  # the add rounds to the input dtype, as in torch


# ---------------------------------------------------------------------------------------
# Paged attention
# ---------------------------------------------------------------------------------------
def make_paged(q_lens, ctx_lens, hq, hkv, d, bs, dtype, seed, extra_cols=0, fused_q=False):
    """Random caches with permuted block tables; seq b has ctx_lens[b] positions, its last
    q_lens[b] are the queries. extra_cols widens the block tables (sink-block columns)."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-c // bs) for c in ctx_lens) + extra_cols
    nb = len(ctx_lens) * max_blocks + 3
    kc, vc = rand(nb, bs, hkv, d, dtype=dtype, g=g), rand(nb, bs, hkv, d, dtype=dtype, g=g)
    tables = torch.randperm(nb, generator=g)[: len(ctx_lens) * max_blocks].view(len(ctx_lens), max_blocks)
    if fused_q:  # q as a strided view of a fused qkv projection, as the model passes it
        q = rand(sum(q_lens), (hq + 2 * hkv) * d, dtype=dtype, g=g)[:, : hq * d].view(-1, hq, d)
    else:
        q = rand(sum(q_lens), hq, d, dtype=dtype, g=g)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    return (q, kc, vc, tables.int().to(DEV), torch.tensor(ctx_lens, dtype=torch.int32, device=DEV), qsl.to(DEV),
            d ** -0.5, max(q_lens), max(ctx_lens))


def ref_attention(args, dtype):
    q, kc, vc, *rest = args
    return paged_attention_ref(as_ref_dtype(q, dtype), as_ref_dtype(kc, dtype), as_ref_dtype(vc, dtype), *rest)


def assert_close_attn(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.allclose(out.float(), ref.float(), atol=TOL[dtype] * 5, rtol=TOL[dtype] * 5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,bs", [(4, 2, 32, 16), (6, 2, 48, 16), (3, 3, 24, 5)])
def test_paged_attention_varlen_prefill(dtype, hq, hkv, d, bs):
    # a fresh prefill, a catch-up over cached context, a single-token step, a long prompt
    args = make_paged([7, 5, 1, 37], [7, 29, 18, 37], hq, hkv, d, bs, dtype, seed=hq * 10 + d, fused_q=hq == 6)
    assert_close_attn(paged_attention_triton(*args), ref_attention(args, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,bs", [(4, 2, 32, 16), (6, 2, 48, 8)])
def test_paged_attention_decode_split_kv(dtype, hq, hkv, d, bs):
    # contexts from one token to many tiles per split (531 > 8 splits x 64), ragged
    ctx = [1, 17, 200, 531]
    args = make_paged([1] * len(ctx), ctx, hq, hkv, d, bs, dtype, seed=3, fused_q=hq == 6)
    assert_close_attn(paged_attention_triton(*args), ref_attention(args, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,bs", [(6, 2, 48, 16), (2, 2, 32, 7)])
def test_paged_attention_short_catch_up_split_kv(dtype, hq, hkv, d, bs):
    # max_query_len <= 16: the LLM's catch-up over a long cached context (split-KV kernel),
    # ragged, with a fresh short prompt and a one-token row in the same batch
    args = make_paged([3, 16, 1, 9], [40, 300, 17, 9], hq, hkv, d, bs, dtype, seed=hq + bs)
    assert_close_attn(paged_attention_triton(*args), ref_attention(args, dtype), dtype)


def test_paged_attention_decode_graph_style_args():
    """A captured graph passes an upper bound for max_seq_len and wider block tables (the
    sink block in the spare columns); the split count does not change the result; the
    split-KV and the varlen kernel agree on decode inputs."""
    ctx = [3, 70, 129]
    args = make_paged([1] * 3, ctx, 4, 1, 16, 4, torch.float32, seed=8, extra_cols=5)
    q, kc, vc, tables, seq_lens, qsl, scale, _, _ = args
    ref = paged_attention_ref(q, kc, vc, tables, seq_lens, qsl, scale, 1, max(ctx))
    for splits in (1, 4, 16):
        out = paged_attention_triton(q, kc, vc, tables, seq_lens, qsl, scale, 1, tables.shape[1] * 4,
                                     num_splits=splits)
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    # an upper bound for max_query_len is fine too; past SPLIT_KV_MAX_Q it picks the varlen kernel
    for bound in (2, SPLIT_KV_MAX_Q + 1):
        out = paged_attention_triton(q, kc, vc, tables, seq_lens, qsl, scale, bound, max(ctx))
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_paged_attention_kernels_agree_on_catch_up():
    """The split-KV and the varlen prefill kernel on the same catch-up batch."""
    args = make_paged([5, 12, 1], [5, 150, 77], 8, 2, 32, 16, torch.float32, seed=12)
    q, kc, vc, tables, seq_lens, qsl, scale, max_q, max_s = args
    split = paged_attention_triton(*args, num_splits=4)
    varlen = paged_attention_triton(q, kc, vc, tables, seq_lens, qsl, scale, SPLIT_KV_MAX_Q + 1, max_s)
    assert torch.allclose(split, varlen, atol=1e-5, rtol=1e-5)
    assert torch.allclose(split, paged_attention_ref(*args), atol=1e-5, rtol=1e-5)


def test_paged_attention_empty_context_lane_is_zero():
    # a padded lane with seq_len 0 must not produce NaN (nor disturb the other lanes)
    args = list(make_paged([1, 1], [0 + 1, 40], 2, 1, 16, 16, torch.float32, seed=9))
    ref = paged_attention_ref(*args)
    args[4] = torch.tensor([0, 40], dtype=torch.int32, device=DEV)
    out = paged_attention_triton(*args)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.allclose(out[1], ref[1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Routed head
# ---------------------------------------------------------------------------------------
def make_head(batch, hidden, vocab, dtype, seed, router_rows=None, head_signals=False):
    g = torch.Generator().manual_seed(seed)
    hs = rand(batch, hidden, dtype=dtype, g=g)
    nw = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(DEV)
    lm = rand(vocab + 11, hidden, dtype=dtype, g=g, scale=0.5)[:vocab]  # a row slice, like vocab_limit
    router = None
    if router_rows:
        router = RouterParams(rand(router_rows, hidden, g=g, scale=0.2), rand(router_rows, g=g, scale=0.1),
                              rand(router_rows, g=g, scale=0.2), rand(1, g=g).reshape(()))
        if head_signals:
            router = router._replace(w_sig=rand(router_rows, 3, g=g, scale=0.3), c_sig=rand(3, g=g))
    return hs, nw, lm, router


def fp32_logits(hs, nw, lm):
    h, _ = rms_norm_ref(hs.float(), nw.float(), 1e-6)
    return h @ lm.float().t(), h


def greedy(batch):
    return torch.zeros(batch, device=DEV), torch.zeros(batch, dtype=torch.int64, device=DEV)


@pytest.mark.parametrize("dtype", DTYPES)
def test_routed_head_greedy_and_router(dtype):
    hs, nw, lm, router = make_head(5, 72, 997, dtype, seed=4, router_rows=144)
    temp, seeds = greedy(5)
    tok, top, score = routed_head_triton(hs, nw, 1e-6, lm, router, temp, seeds, v_splits=3)
    assert tok.dtype == torch.int64 and top.dtype == score.dtype == torch.float32
    logits, h = fp32_logits(hs, nw, lm)
    # the chosen token is the argmax up to rounding ties
    chosen = logits.gather(1, tok[:, None]).squeeze(1)
    assert torch.all(chosen >= logits.max(1).values - TOL[dtype] * 10 * logits.abs().max())
    if dtype != torch.bfloat16:
        ref_tok, ref_top, ref_score = routed_head_ref(hs, nw, 1e-6, lm, router, temp, seeds)
        assert torch.equal(tok, ref_tok)
        assert torch.allclose(top, ref_top, atol=TOL[dtype])
        assert torch.allclose(score, ref_score, atol=TOL[dtype])
    assert torch.allclose(top, torch.softmax(logits, -1).amax(-1), atol=TOL[dtype] * 10)
    assert torch.allclose(score, router_mlp_ref(h, router), atol=TOL[dtype] * 10)
    tok2, _, nan_score = routed_head_triton(hs, nw, 1e-6, lm, None, temp, seeds)  # other split layout
    assert torch.isnan(nan_score).all() and torch.equal(tok2, tok)


@pytest.mark.parametrize("dtype", DTYPES)
def test_routed_head_int8_lm_head(dtype):
    """An int8 lm_head (quantization="int8"): the kernel's logits are the dot of the integer
    rows, times each row's scale; its token, top probability and head signals against the
    float32 logits of the weights it stands for, and in float32 the reference's outputs."""
    from citer.kernels.linear import quantize_int8

    hs, nw, lm, router = make_head(5, 72, 997, dtype, seed=6, router_rows=96, head_signals=True)
    q, s = quantize_int8(lm.float().cpu())
    q, s = q.to(DEV), s.to(DEV)
    temp, seeds = greedy(5)
    tok, top, score, signals = routed_head_triton(hs, nw, 1e-6, q, router, temp, seeds, lm_scale=s, v_splits=3,
                                                  return_signals=True)
    deq = (q.float() * s[:, None])  # the weights the int8 head stands for, in float32
    logits, h = fp32_logits(hs, nw, deq)
    chosen = logits.gather(1, tok[:, None]).squeeze(1)
    assert torch.all(chosen >= logits.max(1).values - TOL[dtype] * 10 * logits.abs().max())
    assert torch.allclose(top, torch.softmax(logits, -1).amax(-1), atol=TOL[dtype] * 10)
    assert torch.allclose(signals, head_signals_ref(logits), atol=TOL[dtype] * 100, rtol=TOL[dtype] * 10)
    if dtype == torch.float32:
        ref_tok, ref_top, ref_score = routed_head_ref(hs, nw, 1e-6, q, router, temp, seeds, lm_scale=s)
        assert torch.equal(tok, ref_tok)
        assert torch.allclose(top, ref_top, atol=TOL[dtype]) and torch.allclose(score, ref_score, atol=TOL[dtype])
    with pytest.raises(ValueError, match="int8 lm_head needs float32 scales"):
        routed_head_triton(hs, nw, 1e-6, q, router, temp, seeds)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,split_k", [(1, 200, 300, None), (5, 130, 300, 3), (19, 64, 256, 1), (40, 97, 150, 2),
                                           (3, 70, 520, 8), (64, 33, 77, None)])
def test_linear_int8_triton(dtype, m, n, k, split_k):
    """The weight-only int8 linear (CUDA's int8 path): the dot of the integer rows times each
    row's scale, plus the bias, against the float32 product with the weights it stands for;
    one program per tile and K split over several (partial sums added after), row tiles
    past 16 and 32, K not a multiple of the chunk."""
    from citer.kernels.linear import quantize_int8
    from citer.kernels.linear_triton import linear_int8_triton

    g = torch.Generator().manual_seed(m * 1000 + n)
    q, s = quantize_int8(torch.randn(n, k, generator=g))
    q, s = q.to(DEV), s.to(DEV)
    x, bias = rand(m, k, dtype=dtype, g=g), rand(n, dtype=dtype, g=g)
    want = x.float() @ (q.float() * s[:, None]).T + bias.float()
    for b, ref in ((bias, want), (None, want - bias.float())):
        got = linear_int8_triton(x, q, s, b, split_k=split_k)
        assert got.dtype == dtype and got.shape == (m, n)
        assert (got.float() - ref).abs().max() <= TOL[dtype] * ref.abs().max(), (m, n, k, split_k)
    for x_view in (rand(m, k + 8, dtype=dtype, g=g)[:, :k], rand(m, 2 * k, dtype=dtype, g=g)[:, ::2]):
        ref = x_view.float() @ (q.float() * s[:, None]).T  # a row stride past K (read in place); a column stride (copied)
        got = linear_int8_triton(x_view, q, s, split_k=split_k)
        assert (got.float() - ref).abs().max() <= TOL[dtype] * ref.abs().max()


def test_linear_int8_triton_checks_and_the_ops_dispatch():
    from citer.kernels.linear import linear_ref, quantize_int8
    from citer.kernels.linear_triton import MAX_KERNEL_ROWS, linear_int8_triton, linear_triton

    q, s = quantize_int8(torch.randn(8, 16))
    q, s, x = q.to(DEV), s.to(DEV), torch.randn(2, 16, device=DEV)
    with pytest.raises(ValueError, match="float32 scales"):
        linear_int8_triton(x, q, None)
    with pytest.raises(ValueError, match="float32 scales"):
        linear_int8_triton(x, q, s.half())
    with pytest.raises(ValueError, match="x \\[M, K\\] and q \\[N, K\\]"):
        linear_int8_triton(torch.randn(2, 15), q, s)
    assert linear_int8_triton(x[:0], q, s).shape == (0, 8)
    w = torch.randn(8, 16, device=DEV)
    assert torch.equal(linear_triton(x, w), linear_ref(x, w))  # float weights: F.linear
    assert torch.allclose(linear_triton(x, q, s), x @ (q.float() * s[:, None]).T, atol=1e-4)
    many = torch.randn(MAX_KERNEL_ROWS + 1, 16, device=DEV)  # a prefill: the reference's GEMM
    assert torch.equal(linear_triton(many, q, s), linear_ref(many, q, s))


@pytest.mark.parametrize("batch,hidden,vocab,rows,v_splits", [(5, 72, 997, 144, 3), (19, 40, 203, 200, 1),
                                                             (3, 24, 130, 48, 7)])
def test_routed_head_signals_and_head_signal_router(batch, hidden, vocab, rows, v_splits):
    """The head's signals (logit of top probability, top-1/top-2 margin, entropy) from the
    online pass equal the reference on full logits, and so does a head-signal router's
    score; ragged split layouts, a row tile over 16 and a reduce loop over R > 128."""
    hs, nw, lm, router = make_head(batch, hidden, vocab, torch.float32, seed=batch, router_rows=rows,
                                   head_signals=True)
    hs[0] *= 6.0  # a sharp row (top probability near 1)
    temp, seeds = greedy(batch)
    tok, top, score, signals = routed_head_triton(hs, nw, 1e-6, lm, router, temp, seeds, v_splits=v_splits,
                                                  return_signals=True)
    logits, h = fp32_logits(hs, nw, lm)
    ref = head_signals_ref(logits)
    assert torch.allclose(signals, ref, atol=1e-4, rtol=1e-4), (signals - ref).abs().max()
    assert torch.allclose(score, router_mlp_ref(h, router, ref), atol=1e-5)
    ref_tok, ref_top, ref_score = routed_head_ref(hs, nw, 1e-6, lm, router, temp, seeds)
    assert torch.equal(tok, ref_tok) and torch.allclose(score, ref_score, atol=1e-5)
    # the signals are what they say
    p = torch.softmax(logits, -1)
    top2 = logits.topk(2, -1).values
    assert torch.allclose(ref[:, 1], top2[:, 0] - top2[:, 1])
    assert torch.allclose(ref[:, 2], -(p * p.clamp_min(1e-30).log()).sum(-1), atol=1e-5)
    moderate = p.amax(-1) < 0.999
    pm = p.amax(-1)[moderate]
    assert torch.allclose(ref[moderate, 0], torch.log(pm / (1 - pm)), atol=1e-3)


def test_head_signals_at_a_tied_top():
    """Two maximal logits: margin 0, top probability 1/2 at most; a one-hot row: logit capped."""
    logits = torch.tensor([[2.0, 5.0, 5.0, 1.0], [0.0, 0.0, 0.0, 0.0], [-100.0, 100.0, -100.0, -100.0]])
    sig = head_signals_ref(logits)
    assert sig[0, 1] == 0 and sig[1, 1] == 0
    assert torch.allclose(sig[1], torch.tensor([-torch.log(torch.tensor(3.0)), 0.0, torch.log(torch.tensor(4.0))]))
    assert torch.allclose(sig[2, 0], torch.tensor(13.8155), atol=1e-3) and sig[2, 2].abs() < 1e-6
    hs, nw, lm, _ = make_head(2, 32, 300, torch.float32, seed=5)
    logits, _ = fp32_logits(hs, nw, lm)
    lm[7] = lm[250] = lm[logits[0].argmax()] * 3  # a tie across splits for row 0
    logits, _ = fp32_logits(hs, nw, lm)
    for v_splits in (1, 3):
        *_, signals = routed_head_triton(hs, nw, 1e-6, lm, None, *greedy(2), v_splits=v_splits, return_signals=True)
        assert signals[0, 1].abs() < 1e-5
        assert torch.allclose(signals, head_signals_ref(logits), atol=1e-4)


def test_routed_head_tie_break_is_lowest_index():
    hs, nw, lm, _ = make_head(2, 32, 300, torch.float32, seed=5)
    logits, _ = fp32_logits(hs, nw, lm)
    lm[7] = lm[130] = lm[250] = lm[logits[0].argmax()] * 3  # three identical maximal rows for row 0
    logits, _ = fp32_logits(hs, nw, lm)
    assert logits[0, 7] == logits[0, 130] == logits[0, 250] == logits[0].max()
    for v_splits in (1, 3, 5):  # ties inside one tile, across tiles, across splits
        tok, _, _ = routed_head_triton(hs, nw, 1e-6, lm, None, *greedy(2), v_splits=v_splits)
        assert torch.equal(tok, logits.argmax(1)) and int(tok[0]) == 7


def test_routed_head_sampling_rows_seeded():
    hs, nw, lm, router = make_head(6, 40, 333, torch.float32, seed=7, router_rows=80)
    temp = torch.tensor([0.0, 1.0, 0.7, 0.0, 1.0, 1.5], device=DEV)
    seeds = torch.tensor([0, 11, 12, 0, 11, 99], dtype=torch.int64, device=DEV)
    tok, top, score = routed_head_triton(hs, nw, 1e-6, lm, router, temp, seeds, v_splits=3)
    ref_tok, ref_top, ref_score = routed_head_ref(hs, nw, 1e-6, lm, router, temp, seeds)
    greedy_rows = temp == 0
    assert torch.equal(tok[greedy_rows], ref_tok[greedy_rows])  # greedy rows unaffected by sampling rows
    assert torch.allclose(top, ref_top, atol=1e-5) and torch.allclose(score, ref_score, atol=1e-5)
    # deterministic for a seed; independent of the split layout and of the row's batch slot
    again, _, _ = routed_head_triton(hs, nw, 1e-6, lm, router, temp, seeds, v_splits=1)
    assert torch.equal(tok, again)
    perm = torch.tensor([5, 4, 3, 2, 1, 0], device=DEV)
    swapped, _, _ = routed_head_triton(hs[perm], nw, 1e-6, lm, None, temp[perm], seeds[perm], v_splits=2)
    assert torch.equal(swapped, tok[perm])
    # different seeds give different draws: a flat-ish row sampled under 16 seeds
    n = 16
    flat = (hs[1:2] * 0.05).expand(n, -1).contiguous()
    toks, _, _ = routed_head_triton(flat, nw, 1e-6, lm, None, torch.full((n,), 2.0, device=DEV),
                                    torch.arange(n, dtype=torch.int64, device=DEV) + 1000)
    assert len(set(toks.tolist())) >= 8


def test_routed_head_gumbel_matches_softmax_frequencies():
    hs, nw, lm, _ = make_head(1, 16, 8, torch.float32, seed=6)
    logits, _ = fp32_logits(hs, nw, lm)
    n, t = 1024, 0.8
    temp = torch.full((n,), t, device=DEV)
    seeds = torch.arange(n, dtype=torch.int64, device=DEV) * 7919 + 1
    tok, _, _ = routed_head_triton(hs.expand(n, -1).contiguous(), nw, 1e-6, lm, None, temp, seeds, v_splits=2)
    freq = torch.bincount(tok.cpu(), minlength=8).double() / n
    probs = torch.softmax(logits[0].cpu().double() / t, -1)
    se = (probs * (1 - probs) / n).sqrt()
    assert torch.all((freq - probs).abs() <= 4 * se + 1e-3), (freq, probs)
    chi2 = float((((freq - probs) * n) ** 2 / (probs * n)).sum())
    assert chi2 < 24.3  # chi-square, 7 degrees of freedom, p = 0.001


def test_routed_head_empty_batch():
    hs, nw, lm, router = make_head(1, 16, 50, torch.float32, seed=2, router_rows=32)
    tok, top, score = routed_head_triton(hs[:0], nw, 1e-6, lm, router, *greedy(0))
    assert tok.shape == top.shape == score.shape == (0,)


@pytest.mark.parametrize("wdtype,xdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.int8, torch.float32), (torch.int8, torch.bfloat16)])
def test_linear_cpu_kernel_equals_reference(wdtype, xdtype):
    """The few-row CPU linear (csrc/cpu_linear.inc) against F.linear on the same (dequantized)
    weights: fresh inputs, odd sizes, 1-16 rows on the kernel itself, and linear_cpu's choice
    (the kernel up to KERNEL_ROWS for these dtypes, then torch) at every row count."""
    from citer.kernels import cpu_ext
    from citer.kernels.linear import FAST_ROWS, linear_cpu, linear_ref, quantize_int8

    g = torch.Generator().manual_seed(7)

    def close(got, ref):  # bfloat16: within 2% of the largest output (int8 weights round to bf16 in the reference only)
        tol = 2e-2 * max(1.0, ref.float().abs().max().item()) if xdtype == torch.bfloat16 else 1e-4
        return got.dtype == xdtype and torch.allclose(got.float(), ref.float(), rtol=1e-4, atol=tol)

    shapes = ((37, 19), (96, 6), (64, 9), (129, 67), (40, 200))  # (k, n): every n mod 4, k tails
    for m in [*range(1, FAST_ROWS + 1), FAST_ROWS + 3]:  # every pass shape of the kernel, then torch
        k, n = shapes[m % len(shapes)]
        x = torch.randn(m, k, generator=g).to(xdtype)
        w = torch.randn(n, k, generator=g)
        bias = torch.randn(n, generator=g).to(xdtype)
        scale = None
        if wdtype == torch.int8:
            w, scale = quantize_int8(w)
        else:
            w = w.to(wdtype)
        ref = linear_ref(x, w, scale, bias)
        got = linear_cpu(x, w, scale, bias)
        assert got.shape == (m, n) and close(got, ref), (m, k, n)
        if m <= FAST_ROWS:
            assert close(cpu_ext.ext.linear(x, w, scale, bias), ref), (m, k, n)
    q, s = quantize_int8(torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]]))
    assert q.dtype == torch.int8 and q[0].tolist() == [64, -127, 32] and torch.isfinite(s).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dequantize_and_many_row_linear_equal_reference(dtype):
    """int8 weights for many rows (a prefill): citer's one-pass dequantization gives the
    reference's weights bit for bit, and the chunked GEMM (chunks of about 1 MB of weights: three
    here, the last one partial; with and without a bias) matches linear_ref."""
    from citer.kernels import cpu_ext
    from citer.kernels.linear import FAST_ROWS, linear_cpu, linear_ref, quantize_int8

    if not FAST_ROWS:
        pytest.skip("this CPU has no AVX-512 BF16")
    g = torch.Generator().manual_seed(13)
    for n, k in ((7, 37), (300, 2048 if dtype == torch.float32 else 4096 - 8)):
        q, s = quantize_int8(3 * torch.randn(n, k, generator=g))
        assert torch.equal(cpu_ext.ext.dequantize_int8(q, s, dtype), (q.float() * s[:, None]).to(dtype))
        for m in (FAST_ROWS + 1, 45):
            x, bias = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
            for b in (None, bias):
                got, ref = linear_cpu(x, q, s, b), linear_ref(x, q, s, b)
                tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
                assert got.dtype == dtype and torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol), (n, k, m)


def test_linear_edge_cases_and_chunked_int8_reference(monkeypatch):
    """linear_cpu with no rows, and float16 activations with int8 weights (the reference
    takes them); linear_ref's int8 dequantization in row chunks equals the whole matrix's."""
    from citer.kernels import linear as lin

    g = torch.Generator().manual_seed(17)
    q, s = lin.quantize_int8(torch.randn(23, 40, generator=g))
    assert lin.linear_cpu(torch.randn(0, 40), q, s).shape == (0, 23)
    x16 = torch.randn(20, 40, generator=g).half()
    assert lin.linear_cpu(x16, q, s).dtype == torch.float16
    x = torch.randn(5, 40, generator=g)
    bias = torch.randn(23, generator=g)
    whole = torch.nn.functional.linear(x, q.float() * s[:, None], bias)
    monkeypatch.setattr(lin, "REF_CHUNK_ROWS", 6)
    assert torch.allclose(lin.linear_ref(x, q, s, bias), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_cpu_kernel_equals_reference(dtype):
    """The CPU decode / short catch-up kernel (csrc/cpu_attention.inc) against the torch
    reference: permuted block tables, ragged lengths, GQA, a non-power-of-two head size."""
    from citer.kernels.paged_attention import FAST_ATTENTION_ROWS, paged_attention_cpu

    if not FAST_ATTENTION_ROWS:
        pytest.skip("this CPU has no AVX-512 BF16")
    g = torch.Generator().manual_seed(11)
    for hq, hkv, d, q_lens, ctx in ((6, 2, 40, [1, 1, 1], [5, 33, 17]), (4, 4, 64, [3, 1, 7], [9, 30, 7]),
                                    (8, 1, 24, [2, 5], [40, 5])):
        bs, nb = 4, 40
        kc = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
        vc = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
        perm = torch.randperm(nb, generator=g)
        tables = torch.stack([perm[i * 12:(i + 1) * 12] for i in range(len(q_lens))]).to(torch.int32)
        q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
        lens = torch.tensor(ctx, dtype=torch.int32)
        qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
        got = paged_attention_cpu(q, kc, vc, tables, lens, qsl, d ** -0.5, max(q_lens), max(ctx))
        ref = paged_attention_ref(q, kc, vc, tables, lens, qsl, d ** -0.5, max(q_lens), max(ctx))
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol), (hq, hkv, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_cpu_kernel_equals_reference(dtype):
    """The CPU RMSNorm (csrc/cpu_norm.inc) against rms_norm_ref: odd widths, strided rows,
    with and without the fused residual; bfloat16 bit for bit but for rare one-ulp steps
    (the order of the sum of squares), float32 within rounding."""
    from citer.kernels.cpu_ext import AVAILABLE
    from citer.kernels.rmsnorm import rms_norm_cpu

    if not AVAILABLE:
        pytest.skip("this CPU has no AVX-512 BF16")
    g = torch.Generator().manual_seed(5)
    for t, h in ((1, 256), (3, 77), (40, 16), (5, 1000)):
        x = torch.randn(t, h + 3, generator=g).to(dtype)[:, 1:h + 1]  # rows strided, columns unit stride
        w = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
        r = torch.randn(t, h, generator=g).to(dtype)
        for res in (None, r):
            got, got_res = rms_norm_cpu(x, w, 1e-6, res)
            ref, ref_res = rms_norm_ref(x, w, 1e-6, res)
            assert got.dtype == dtype and got.shape == (t, h) and got.is_contiguous()
            if res is None:
                assert got_res is None
            else:
                assert torch.equal(got_res, ref_res)  # the add rounds exactly as torch's
            if dtype == torch.float32:
                assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), (t, h)
            else:
                ulp = (got.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-30)
                assert (got != ref).float().mean() < 0.02 and ulp.max() <= 2 ** -7, (t, h)


@pytest.mark.parametrize("w1_dtype", [torch.float32, torch.float16])
def test_router_mlp_cpu_kernel_equals_reference(w1_dtype):
    """The one-call CPU router (csrc/cpu_router.inc) against router_mlp_ref on the same
    weights (float16 W1 as a shipped router stores it, widened exactly); a head-signal
    router and rows past the kernel's take the reference."""
    from citer.kernels.linear import FAST_ROWS
    from citer.kernels.routed_head import router_mlp_cpu

    if not FAST_ROWS:
        pytest.skip("this CPU has no AVX-512 BF16")
    g = torch.Generator().manual_seed(9)
    for b, h, r in ((1, 256, 512), (3, 77, 154), (FAST_ROWS, 40, 13), (FAST_ROWS + 2, 24, 48)):
        w1 = (0.1 * torch.randn(r, h, generator=g)).to(w1_dtype)
        router = (w1, torch.randn(r, generator=g), 0.2 * torch.randn(r, generator=g), torch.tensor(0.1))
        x = torch.randn(b, h, generator=g)
        got = router_mlp_cpu(x, router)
        ref = router_mlp_ref(x, (w1.float(), *router[1:]))
        assert got.shape == (b,) and got.dtype == torch.float32
        assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6), (b, h, r)
    sig = (torch.randn(8, 16, generator=g), torch.randn(8, generator=g), torch.randn(8, generator=g),
           torch.tensor(0.0), torch.randn(8, 3, generator=g), torch.randn(3, generator=g))
    x, s = torch.randn(2, 16, generator=g), torch.randn(2, 3, generator=g)
    assert torch.equal(router_mlp_cpu(x, sig, s), router_mlp_ref(x, sig, s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_router_with_the_final_norm_in_its_call(dtype):
    """router_mlp_cpu(hidden, norm=(w, eps)) normalises in the same call (a decode step's
    router is one call): the scores of the separately normed rows, bit for bit, on the
    kernel and on the paths that fall back (float16 rows, whose norm the kernel does not
    take, rows past the kernel's, a head-signal router)."""
    from citer.kernels.linear import FAST_ROWS
    from citer.kernels.rmsnorm import rms_norm_cpu
    from citer.kernels.routed_head import router_mlp_cpu

    g = torch.Generator().manual_seed(4)
    for b, h, r in ((1, 256, 512), (3, 77, 154), (max(FAST_ROWS, 1) + 2, 24, 48)):
        router = ((0.1 * torch.randn(r, h, generator=g)).half(), torch.randn(r, generator=g),
                  0.2 * torch.randn(r, generator=g), torch.tensor(0.1))
        hidden = (3 * torch.randn(b, h, generator=g)).to(dtype)
        w = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
        got = router_mlp_cpu(hidden, router, norm=(w, 1e-6))
        assert torch.equal(got, router_mlp_cpu(rms_norm_cpu(hidden, w, 1e-6)[0], router)), (b, h, r)
    sig = (torch.randn(8, 16, generator=g), torch.randn(8, generator=g), torch.randn(8, generator=g),
           torch.tensor(0.0), torch.randn(8, 3, generator=g), torch.randn(3, generator=g))
    hidden, s, w = torch.randn(2, 16, generator=g), torch.randn(2, 3, generator=g), torch.rand(16, generator=g)
    assert torch.equal(router_mlp_cpu(hidden, sig, s, norm=(w, 1e-5)),
                       router_mlp_ref(rms_norm_cpu(hidden, w, 1e-5)[0], sig, s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_cpu_kernel_equals_reference(dtype):
    """The CPU rotary (csrc/cpu_rotary.inc) against rotary_ref, bit for bit: q and k as strided
    views of a fused projection, GQA, head sizes with a half under and over one vector."""
    from citer.kernels.cpu_ext import AVAILABLE
    from citer.kernels.rotary import rotary_cpu, rotary_ref

    if not AVAILABLE:
        pytest.skip("this CPU has no AVX-512 BF16")
    g = torch.Generator().manual_seed(13)
    for t, hq, hkv, d in ((1, 9, 3, 64), (5, 4, 2, 40), (3, 2, 1, 98), (33, 6, 6, 16)):
        qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
        q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k = q.view(t, hq, d), k.view(t, hkv, d)
        ang = torch.rand(t, 1, d // 2, generator=g) * 100
        cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
        got, ref = rotary_cpu(q, k, cos, sin), rotary_ref(q, k, cos, sin)
        for a, b in zip(got, ref):
            assert a.is_contiguous() and torch.equal(a, b), (t, hq, hkv, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kvcache_cpu_kernel_equals_reference(dtype):
    """The CPU KV store (csrc/cpu_kv_store.inc) writes what store_kvcache_ref writes: strided
    rows, permuted slots, skipped (-1) lanes, int32 and int64 slot maps; a slot past the
    cache is refused."""
    from citer.kernels.kv_store import store_kvcache_cpu

    g = torch.Generator().manual_seed(17)
    for t, hkv, d, slot_dtype in ((1, 3, 64, torch.int64), (6, 2, 40, torch.int32)):
        kv = torch.randn(t, 3 * hkv * d, generator=g).to(dtype)
        k, v = kv[:, hkv * d:2 * hkv * d].view(t, hkv, d), kv[:, 2 * hkv * d:].view(t, hkv, d)
        slots = torch.randperm(40, generator=g)[:t].to(slot_dtype)
        slots[t // 2] = -1
        caches = [[torch.zeros(10, 4, hkv, d, dtype=dtype) for _ in range(2)] for _ in range(2)]
        store_kvcache_cpu(k, v, *caches[0], slots)
        store_kvcache_ref(k, v, *caches[1], slots)
        assert all(torch.equal(a, b) for a, b in zip(*caches))
    with pytest.raises(RuntimeError, match="past the cache"):
        store_kvcache_cpu(k, v, *caches[0], torch.full((t,), 40, dtype=torch.int64))


def test_head_stats_cpu_kernel_equals_torch():
    """The CPU head statistics (csrc/cpu_head_stats.inc): greedy tokens equal torch.argmax
    (ties to the lowest index, across and within vector lanes), top probabilities and head
    signals equal the torch references within float32 rounding; odd vocabularies, rows
    strided as a vocab_limit slice leaves them, a repeated maximum."""
    from citer.kernels.routed_head import head_signals_cpu
    from citer.kernels.cpu_ext import AVAILABLE
    from citer.kernels.sampling import choose_tokens

    if not AVAILABLE:
        pytest.skip("this CPU has no AVX-512 BF16")
    g = torch.Generator().manual_seed(19)
    for b, v in ((1, 151), (3, 1000), (2, 16), (4, 17), (1, 32003)):
        logits = (torch.randn(b, v + 5, generator=g) * 4)[:, :v]
        logits[0, v // 3] = logits[0, v - 1] = logits[0].max() + 1.0  # a tie at the top: lowest index wins
        if b > 1 and v > 21:
            logits[1, 5] = logits[1, 21] = logits[1].max() + 2.0  # the same lane of two vectors
        greedy = torch.zeros(b), torch.zeros(b, dtype=torch.int64)
        tokens, top_prob = choose_tokens(logits, *greedy)
        assert torch.equal(tokens, logits.argmax(-1)), (b, v)
        assert torch.allclose(top_prob, torch.softmax(logits, -1).amax(-1), rtol=1e-5, atol=0)
        got, ref = head_signals_cpu(logits), head_signals_ref(logits)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), (b, v, (got - ref).abs().max())
        assert got[0, 1] == 0  # the repeated maximum: top-1 minus top-2 is 0
    # a confident step: the rest of the distribution is 3e-4 of the top token's mass, spread
    # thin; -log(rest) against float64 (the top token's exact 1 must not swallow the tail)
    for top in (0, 7, 151935):
        logits = torch.full((1, 151936), -20.0)
        logits[0, top] = 0.0
        x = logits.double()
        rest = torch.exp(x - x.max()).sum() - 1.0
        got = head_signals_cpu(logits)
        assert abs(float(got[0, 0]) + float(torch.log(rest))) < 1e-4, (top, float(got[0, 0]))
        assert int(choose_tokens(logits, *(torch.zeros(1), torch.zeros(1, dtype=torch.int64)))[0]) == top
