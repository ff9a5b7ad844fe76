"""Each Triton kernel against its torch reference, under TRITON_INTERPRET=1 on CPU (and
compiled for real on a GPU): fresh random inputs, permuted block tables, ragged lengths,
non-power-of-two sizes, GQA, fp32 / fp16 / bf16."""
import os
import subprocess
import sys

import pytest
import torch

from citer.kernels.kv_store import store_kvcache_ref, store_kvcache_triton
from citer.kernels.ops import resolve_backend
from citer.kernels.paged_attention import paged_attention_ref, paged_attention_triton
from citer.kernels.rmsnorm import rms_norm_ref, rms_norm_triton
from citer.kernels.routed_head import router_mlp_ref, routed_head_ref, routed_head_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rand(*shape, dtype=torch.float32, g=None, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kvcache(dtype):
    g = torch.Generator().manual_seed(0)
    nb, bs, hkv, d = 7, 16, 3, 40  # Hkv * D = 120: not a power of two
    kc, vc = torch.zeros(nb, bs, hkv, d, dtype=dtype, device=DEV), torch.zeros(nb, bs, hkv, d, dtype=dtype, device=DEV)
    kr, vr = kc.clone(), vc.clone()
    slots = torch.randperm(nb * bs, generator=g)[:13]
    slots[[2, 7]] = -1  # padded lanes
    slots = slots.to(DEV)
    qkv = rand(13, 2 * hkv * d + 5, dtype=dtype, g=g)  # key/value as strided views, like the model's
    key = qkv[:, : hkv * d].view(13, hkv, d)
    value = qkv[:, hkv * d: 2 * hkv * d].view(13, hkv, d)
    store_kvcache_triton(key, value, kc, vc, slots)
    store_kvcache_ref(key, value, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    g = torch.Generator().manual_seed(1)
    x, w = rand(5, 72, dtype=dtype, g=g), rand(72, dtype=dtype, g=g)
    r = rand(5, 72, dtype=dtype, g=g) if with_residual else None
    out, res = rms_norm_triton(x, w, 1e-6, r)
    ref, ref_res = rms_norm_ref(x.float() if dtype == torch.bfloat16 else x, w.float() if dtype == torch.bfloat16 else w,
                                1e-6, (r.float() if dtype == torch.bfloat16 else r) if r is not None else None)
    tol = TOL[dtype] * 10
    assert torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol)
    if with_residual:
        assert torch.allclose(res.float(), ref_res.float(), atol=tol, rtol=tol)
    if dtype == torch.float32:
        ref32, _ = rms_norm_ref(x, w, 1e-6, r)
        assert torch.allclose(out, ref32, atol=1e-6, rtol=1e-5)


def make_paged(q_lens, ctx_lens, hq, hkv, d, bs, dtype, seed):
    """Random caches with permuted block tables; seq b has ctx_lens[b] positions, its last
    q_lens[b] are the queries."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-c // bs) for c in ctx_lens)
    nb = len(ctx_lens) * max_blocks + 3
    kc, vc = rand(nb, bs, hkv, d, dtype=dtype, g=g), rand(nb, bs, hkv, d, dtype=dtype, g=g)
    tables = torch.randperm(nb, generator=g)[: len(ctx_lens) * max_blocks].view(len(ctx_lens), max_blocks)
    q = rand(sum(q_lens), hq, d, dtype=dtype, g=g)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    return (q, kc, vc, tables.int().to(DEV), torch.tensor(ctx_lens, dtype=torch.int32, device=DEV), qsl.to(DEV),
            d ** -0.5, max(q_lens), max(ctx_lens))


def ref_attention(args, dtype):
    if dtype == torch.bfloat16:  # the reference in fp32 on the same bf16 values
        q, kc, vc, *rest = args
        return paged_attention_ref(q.float(), kc.float(), vc.float(), *rest).to(dtype)
    return paged_attention_ref(*args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 32), (6, 2, 48), (3, 3, 24)])
def test_paged_attention_varlen_prefill(dtype, hq, hkv, d):
    # a fresh prefill, a catch-up over cached context, a single-token step, a long prompt
    args = make_paged([7, 5, 1, 37], [7, 29, 18, 37], hq, hkv, d, 16, dtype, seed=hq * 10 + d)
    out = paged_attention_triton(*args)
    ref = ref_attention(args, dtype)
    assert torch.allclose(out.float(), ref.float(), atol=TOL[dtype] * 5, rtol=TOL[dtype] * 5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 32), (6, 2, 48)])
def test_paged_attention_decode_split_kv(dtype, hq, hkv, d):
    # contexts from one page to many (more pages than splits), ragged
    ctx = [1, 17, 200, 531]
    args = make_paged([1] * len(ctx), ctx, hq, hkv, d, 16, dtype, seed=3)
    out = paged_attention_triton(*args)
    ref = ref_attention(args, dtype)
    assert torch.allclose(out.float(), ref.float(), atol=TOL[dtype] * 5, rtol=TOL[dtype] * 5)


def make_head(batch, hidden, vocab, dtype, seed, router_rows=None):
    g = torch.Generator().manual_seed(seed)
    hs = rand(batch, hidden, dtype=dtype, g=g)
    nw = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(DEV)
    lm = rand(vocab, hidden, dtype=dtype, g=g, scale=0.5)
    router = None
    if router_rows:
        router = (rand(router_rows, hidden, g=g, scale=0.2), rand(router_rows, g=g, scale=0.1),
                  rand(router_rows, g=g, scale=0.2), rand(1, g=g).reshape(()))
    return hs, nw, lm, router


def fp32_logits(hs, nw, lm):
    h, _ = rms_norm_ref(hs.float(), nw.float(), 1e-6)
    return h @ lm.float().t(), h


@pytest.mark.parametrize("dtype", DTYPES)
def test_routed_head_greedy_and_router(dtype):
    hs, nw, lm, router = make_head(5, 72, 997, dtype, seed=4, router_rows=144)
    temp = torch.zeros(5, device=DEV)
    seeds = torch.zeros(5, dtype=torch.int64, device=DEV)
    tok, top, score = routed_head_triton(hs, nw, 1e-6, lm, router, temp, seeds, v_splits=3)
    logits, h = fp32_logits(hs, nw, lm)
    # the chosen token is the argmax up to rounding ties
    chosen = logits.gather(1, tok[:, None]).squeeze(1)
    assert torch.all(chosen >= logits.max(1).values - TOL[dtype] * 10 * logits.abs().max())
    if dtype == torch.float32:
        assert torch.equal(tok, logits.argmax(1))
        assert torch.equal(tok, routed_head_ref(hs, nw, 1e-6, lm, router, temp, seeds)[0])
    assert torch.allclose(top, torch.softmax(logits, -1).amax(-1), atol=TOL[dtype] * 10)
    assert torch.allclose(score, router_mlp_ref(h, *router), atol=TOL[dtype] * 10)
    _, _, nan_score = routed_head_triton(hs, nw, 1e-6, lm, None, temp, seeds)
    assert torch.isnan(nan_score).all()


def test_routed_head_tie_break_is_lowest_index():
    hs, nw, lm, _ = make_head(2, 32, 300, torch.float32, seed=5)
    lm[250] = lm[7] = lm[130]  # three identical rows: identical logits
    logits, _ = fp32_logits(hs, nw, lm)
    winner = logits.argmax(1)
    lm[7] = lm[130] = lm[250] = lm[winner[0]].clone() * 3  # make them the maximum for row 0
    tok, _, _ = routed_head_triton(hs, nw, 1e-6, lm, None, torch.zeros(2, device=DEV),
                                   torch.zeros(2, dtype=torch.int64, device=DEV), v_splits=4)
    logits, _ = fp32_logits(hs, nw, lm)
    assert torch.equal(tok, logits.argmax(1))


def test_routed_head_sampling_seeded_and_distributed():
    hs, nw, lm, _ = make_head(1, 16, 8, torch.float32, seed=6)
    logits, _ = fp32_logits(hs, nw, lm)
    n = 512
    temp = torch.full((n,), 0.8, device=DEV)
    seeds = torch.arange(n, dtype=torch.int64, device=DEV) * 7919 + 1
    tok, _, _ = routed_head_triton(hs.expand(n, -1).contiguous(), nw, 1e-6, lm, None, temp, seeds, v_splits=2)
    again, _, _ = routed_head_triton(hs.expand(n, -1).contiguous(), nw, 1e-6, lm, None, temp, seeds, v_splits=2)
    assert torch.equal(tok, again)
    freq = torch.bincount(tok.cpu(), minlength=8).float() / n
    probs = torch.softmax(logits[0].cpu() / 0.8, -1)
    assert (freq - probs).abs().max() < 0.07  # binomial s.e. <= 0.022 at n = 512
    assert len(set(tok.tolist())) > 1


def test_resolve_backend_errors():
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend(torch.device("cpu"), "cuda-magic")
    assert resolve_backend(torch.device("cpu"), "torch") == "torch"
    if DEV == "cpu":
        code = ("import torch; from citer.kernels.ops import resolve_backend; "
                "resolve_backend(torch.device('cpu'), 'triton')")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert res.returncode != 0 and "TRITON_INTERPRET=1" in res.stderr
