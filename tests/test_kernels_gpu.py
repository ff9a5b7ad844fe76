"""GPU-only: the Triton kernels compiled for real at model-like sizes vs the references,
CUDA-graph capture and replay of the decode-step kernels, flash-attn as a cross-check of
paged attention where it is installed, and the engine end to end on CUDA vs
transformers. Skipped on machines without CUDA."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from citer.kernels.kv_store import store_kvcache_ref, store_kvcache_triton  # noqa: E402
from citer.kernels.paged_attention import paged_attention_ref, paged_attention_triton  # noqa: E402
from citer.kernels.rmsnorm import rms_norm_ref, rms_norm_triton  # noqa: E402
from citer.kernels.routed_head import routed_head_ref, routed_head_triton, router_mlp_ref  # noqa: E402

DEV = "cuda"


def _paged(q_lens, ctx, hq, hkv, d, bs, dtype, seed=0, extra_cols=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    max_blocks = max(-(-c // bs) for c in ctx) + extra_cols
    nb = len(ctx) * max_blocks + 1
    kc = torch.randn(nb, bs, hkv, d, generator=g).to(DEV, dtype)
    vc = torch.randn(nb, bs, hkv, d, generator=g).to(DEV, dtype)
    tables = torch.randperm(nb, generator=g)[: len(ctx) * max_blocks].view(len(ctx), max_blocks).int().to(DEV)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(DEV, dtype)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    return q, kc, vc, tables, torch.tensor(ctx, dtype=torch.int32, device=DEV), qsl.to(DEV), d ** -0.5, max(q_lens), max(ctx)


def _assert_attn_close(out, args):
    q, kc, vc, *rest = args
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), *rest)
    low = paged_attention_ref(*args).float()  # torch doing the same math in the low dtype
    err, base = (out.float() - ref).abs().max(), (low - ref).abs().max()
    assert err <= 3 * base + 1e-3, (err, base)  # flash-attn's rule: within 3x the low-precision torch error


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(28, 4), (12, 2)])
@pytest.mark.parametrize("q_lens,ctx", [([1] * 8, [17, 300, 4096, 1, 999, 33, 8000, 64]),
                                        ([37, 1, 200, 8], [37, 500, 900, 4100])])
def test_paged_attention_real_sizes(dtype, hq, hkv, q_lens, ctx):
    args = _paged(q_lens, ctx, hq, hkv, 128, 16, dtype)
    _assert_attn_close(paged_attention_triton(*args), args)


@pytest.mark.parametrize("bs", [1, 8, 32, 256])
def test_paged_attention_block_sizes(bs):
    for q_lens, ctx in (([1] * 3, [5, 700, 2049]), ([9, 1, 64], [9, 700, 2049])):
        args = _paged(q_lens, ctx, 12, 2, 128, bs, torch.bfloat16, seed=bs)
        _assert_attn_close(paged_attention_triton(*args), args)


def test_paged_attention_fp32_is_exact():
    args = _paged([1, 5, 1], [100, 333, 2000], 8, 2, 64, 16, torch.float32)
    ref = paged_attention_ref(*args)
    assert torch.allclose(paged_attention_triton(*args), ref, atol=1e-5, rtol=1e-5)  # IEEE dots, no TF32


def test_paged_attention_matches_flash_attn():
    flash = pytest.importorskip("flash_attn")
    # decode, and a uniform catch-up (flash-attn's causal mask is bottom-right aligned: the
    # queries are the last positions, as here); flash-attn's paged API wants pages of 256
    for q_len in (1, 6):
        args = _paged([q_len] * 4, [100, 2000, 31, 512], 32, 8, 128, 256, torch.float16)
        q, kc, vc, tables, seq_lens, *_ = args
        out = paged_attention_triton(*args)
        ref = flash.flash_attn_with_kvcache(q.view(4, q_len, 32, 128), kc, vc, cache_seqlens=seq_lens,
                                            block_table=tables, softmax_scale=128 ** -0.5, causal=True)
        assert (out.float() - ref.reshape(out.shape).float()).abs().max() < 2e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_and_kv_store_real_sizes(dtype):
    x, r = torch.randn(33, 3584, device=DEV, dtype=dtype), torch.randn(33, 3584, device=DEV, dtype=dtype)
    w = torch.randn(3584, device=DEV, dtype=dtype)
    out, res = rms_norm_triton(x, w, 1e-6, r)
    ref, ref_res = rms_norm_ref(x, w, 1e-6, r)
    assert torch.allclose(out.float(), ref.float(), atol=5e-2, rtol=2e-2) and torch.equal(res, ref_res)
    kc, vc = torch.zeros(64, 16, 4, 128, device=DEV, dtype=dtype), torch.zeros(64, 16, 4, 128, device=DEV, dtype=dtype)
    kr, vr = kc.clone(), vc.clone()
    k, v = torch.randn(50, 4, 128, device=DEV, dtype=dtype), torch.randn(50, 4, 128, device=DEV, dtype=dtype)
    slots = torch.randperm(1024, device=DEV)[:50]
    slots[::7] = -1
    store_kvcache_triton(k, v, kc, vc, slots)
    store_kvcache_ref(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


def _head(batch, hidden=1536, vocab=151936, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hs = torch.randn(batch, hidden, generator=g).to(DEV, dtype)
    nw = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEV, dtype)
    lm = (torch.randn(vocab, hidden, generator=g) * 0.02).to(DEV, dtype)
    router = tuple(t.to(DEV) for t in (torch.randn(2 * hidden, hidden, generator=g) * 0.02, torch.zeros(2 * hidden),
                                       torch.randn(2 * hidden, generator=g) * 0.02, torch.zeros(())))
    return hs, nw, lm, router


@pytest.mark.parametrize("batch", [1, 8, 40])
def test_routed_head_real_sizes(batch):
    hs, nw, lm, router = _head(batch)
    tok, top, score = routed_head_triton(hs, nw, 1e-6, lm, router, torch.zeros(batch, device=DEV),
                                         torch.zeros(batch, dtype=torch.int64, device=DEV))
    h = rms_norm_ref(hs, nw, 1e-6)[0]  # bf16, as the kernel feeds the dot
    logits = h.float() @ lm.float().t()
    chosen = logits.gather(1, tok[:, None]).squeeze(1)
    assert torch.all(chosen >= logits.max(1).values - 1e-2)
    assert torch.allclose(top, torch.softmax(logits, -1).amax(-1), atol=1e-3)
    assert torch.allclose(score, router_mlp_ref(h, router), atol=1e-3)


@pytest.mark.parametrize("batch", [1, 40])
def test_routed_head_signal_router_real_sizes(batch):
    from citer.engine.models.router import RouterParams
    from citer.kernels.routed_head import head_signals_ref

    hs, nw, lm, router = _head(batch)
    g = torch.Generator().manual_seed(1)
    router = RouterParams(*router, (torch.randn(router[0].shape[0], 3, generator=g) * 0.1).to(DEV),
                          torch.tensor([1.0, 0.0, 0.0], device=DEV))
    tok, top, score, signals = routed_head_triton(hs, nw, 1e-6, lm, router, torch.zeros(batch, device=DEV),
                                                  torch.zeros(batch, dtype=torch.int64, device=DEV),
                                                  return_signals=True)
    h = rms_norm_ref(hs, nw, 1e-6)[0]
    ref = head_signals_ref(h.float() @ lm.float().t())
    assert torch.allclose(signals, ref, atol=2e-2, rtol=1e-2)
    assert torch.allclose(score, router_mlp_ref(h, router, ref), atol=1e-3)


def test_routed_head_fp32_matches_reference_exactly():
    hs, nw, lm, router = _head(5, hidden=256, vocab=5000, dtype=torch.float32)
    temp, seeds = torch.zeros(5, device=DEV), torch.zeros(5, dtype=torch.int64, device=DEV)
    tok, top, score = routed_head_triton(hs, nw, 1e-6, lm, router, temp, seeds)
    ref_tok, ref_top, ref_score = routed_head_ref(hs, nw, 1e-6, lm, router, temp, seeds)
    assert torch.equal(tok, ref_tok)
    assert torch.allclose(top, ref_top, atol=1e-5) and torch.allclose(score, ref_score, atol=1e-5)


def test_routed_head_sampling_on_gpu():
    hs, nw, lm, _ = _head(1, hidden=64, vocab=8, dtype=torch.float32)
    n, t = 4096, 0.8
    tok, _, _ = routed_head_triton(hs.expand(n, -1).contiguous(), nw, 1e-6, lm, None, torch.full((n,), t, device=DEV),
                                   torch.arange(n, dtype=torch.int64, device=DEV))
    logits = rms_norm_ref(hs, nw, 1e-6)[0] @ lm.t()
    probs = torch.softmax(logits[0].double() / t, -1).cpu()
    freq = torch.bincount(tok.cpu(), minlength=8).double() / n
    assert torch.all((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt() + 1e-3)


def test_decode_step_kernels_capture_in_a_cuda_graph():
    """Decode attention and the routed head run inside a captured CUDA graph (no host
    sync, grids independent of the context lengths); replays after the static inputs
    change in place (longer contexts, other seeds) match the references."""
    batch, hq, hkv, d = 4, 12, 2, 128
    args = list(_paged([1] * batch, [100, 700, 5, 3000], hq, hkv, d, 16, torch.bfloat16, extra_cols=300))
    q, kc, vc, tables, seq_lens, qsl, scale = args[:7]
    hs, nw, lm, router = _head(batch, vocab=32000)
    temp = torch.tensor([0.0, 0.9, 0.0, 1.2], device=DEV)
    seeds = torch.tensor([0, 5, 0, 9], dtype=torch.int64, device=DEV)
    max_len = tables.shape[1] * 16

    def step():
        return (paged_attention_triton(q, kc, vc, tables, seq_lens, qsl, scale, 1, max_len),
                routed_head_triton(hs, nw, 1e-6, lm, router, temp, seeds))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()  # warm up: compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn_out, (tok_out, top_out, score_out) = step()
    for new_lens, new_seeds in (([100, 700, 5, 3000], [0, 5, 0, 9]), ([101, 2048, 6, 4100], [0, 6, 0, 10])):
        seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        seeds.copy_(torch.tensor(new_seeds))
        hs.copy_(torch.randn_like(hs))
        graph.replay()
        torch.cuda.synchronize()
        eager_attn, (eager_tok, eager_top, eager_score) = step()
        assert torch.equal(attn_out, eager_attn)
        assert torch.equal(tok_out, eager_tok) and torch.equal(top_out, eager_top)
        assert torch.equal(score_out, eager_score)
        _assert_attn_close(attn_out, [q, kc, vc, tables, seq_lens, qsl, scale, 1, max(new_lens)])


def test_engine_on_cuda_matches_transformers(hf_models):
    from citer import Engine, SamplingParams
    from conftest import random_prompts

    slm_path, slm_hf = hf_models["qwen2"]
    llm_path, llm_hf = hf_models["llama"]
    engine = Engine(slm_path, llm_path, device="cuda", dtype="float32", block_size=16, num_blocks=64,
                    max_model_len=128)
    assert engine.backend == "triton"
    prompts = random_prompts(3, 5, 40, seed=31)
    for policy, hf in (("slm", slm_hf), ("llm", llm_hf)):
        outs = engine.generate(prompts, SamplingParams(max_tokens=12, policy=policy, ignore_eos=True))
        for p, o in zip(prompts, outs):
            with torch.no_grad():
                ref = hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            assert o.token_ids == ref  # fp32, IEEE dots in the kernels: same greedy tokens


def test_engine_with_flash_attn_attention(hf_models):
    """attention="flash-attn": same first tokens as the Triton kernel (fp16), and its CUDA
    graphs replay what the eager engine computes."""
    pytest.importorskip("flash_attn")
    from citer import Engine, SamplingParams
    from conftest import random_prompts

    path = hf_models["qwen2"][0]
    kw = dict(device="cuda", dtype="float16", block_size=256, num_blocks=8, max_model_len=512)
    prompts = random_prompts(4, 5, 300, seed=41)  # one spans two pages
    params = SamplingParams(max_tokens=6, policy="slm", ignore_eos=True)
    triton_out = Engine(path, enforce_eager=True, **kw).generate(prompts, params)
    flash_eager = Engine(path, attention="flash-attn", enforce_eager=True, **kw).generate(prompts, params)
    flash_graphs = Engine(path, attention="flash-attn", **kw).generate(prompts, params)
    assert [o.token_ids[0] for o in flash_eager] == [o.token_ids[0] for o in triton_out]
    assert [o.token_ids for o in flash_graphs] == [o.token_ids for o in flash_eager]
