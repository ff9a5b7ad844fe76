"""GPU-only: the Triton kernels compiled for real at model-like sizes vs the references,
flash-attn as a cross-check of paged attention where it is installed, and the engine end
to end on CUDA vs transformers. Skipped on machines without CUDA."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from citer.kernels.kv_store import store_kvcache_ref, store_kvcache_triton  # noqa: E402
from citer.kernels.paged_attention import paged_attention_ref, paged_attention_triton  # noqa: E402
from citer.kernels.rmsnorm import rms_norm_ref, rms_norm_triton  # noqa: E402
from citer.kernels.routed_head import routed_head_triton, router_mlp_ref  # noqa: E402

DEV = "cuda"


def _paged(q_lens, ctx, hq, hkv, d, bs, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    max_blocks = max(-(-c // bs) for c in ctx)
    nb = len(ctx) * max_blocks + 1
    kc = torch.randn(nb, bs, hkv, d, generator=g).to(DEV, dtype)
    vc = torch.randn(nb, bs, hkv, d, generator=g).to(DEV, dtype)
    tables = torch.randperm(nb, generator=g)[: len(ctx) * max_blocks].view(len(ctx), max_blocks).int().to(DEV)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(DEV, dtype)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    return q, kc, vc, tables, torch.tensor(ctx, dtype=torch.int32, device=DEV), qsl.to(DEV), d ** -0.5, max(q_lens), max(ctx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_lens,ctx", [([1] * 8, [17, 300, 4096, 1, 999, 33, 8000, 64]), ([37, 1, 200], [37, 500, 900])])
def test_paged_attention_real_sizes(dtype, q_lens, ctx):
    args = _paged(q_lens, ctx, 28, 4, 128, 16, dtype)
    out = paged_attention_triton(*args)
    q, kc, vc, *rest = args
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), *rest)
    low = paged_attention_ref(*args).float()  # torch doing the same math in the low dtype
    err, base = (out.float() - ref).abs().max(), (low - ref).abs().max()
    assert err <= 3 * base + 1e-3  # flash-attn's rule: within 3x the low-precision torch error


def test_paged_attention_matches_flash_attn():
    flash = pytest.importorskip("flash_attn")
    args = _paged([1] * 4, [100, 2000, 31, 512], 32, 8, 128, 256, torch.float16)
    q, kc, vc, tables, seq_lens, *_ = args
    out = paged_attention_triton(*args)
    ref = flash.flash_attn_with_kvcache(q[:, None], kc, vc, cache_seqlens=seq_lens, block_table=tables,
                                        softmax_scale=128 ** -0.5, causal=True)[:, 0]
    assert (out.float() - ref.float()).abs().max() < 2e-2


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


@pytest.mark.parametrize("batch", [1, 8])
def test_routed_head_real_sizes(batch):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden, vocab = 1536, 151936
    hs = torch.randn(batch, hidden, generator=g).to(DEV, torch.bfloat16)
    nw = torch.ones(hidden, device=DEV, dtype=torch.bfloat16)
    lm = (torch.randn(vocab, hidden, generator=g) * 0.02).to(DEV, torch.bfloat16)
    router = tuple(t.to(DEV) for t in (torch.randn(2 * hidden, hidden, generator=g) * 0.02, torch.zeros(2 * hidden),
                                       torch.randn(2 * hidden, generator=g) * 0.02, torch.zeros(())))
    tok, top, score = routed_head_triton(hs, nw, 1e-6, lm, router, torch.zeros(batch, device=DEV),
                                         torch.zeros(batch, dtype=torch.int64, device=DEV))
    h = rms_norm_ref(hs.float(), nw.float(), 1e-6)[0]
    logits = h @ lm.float().t()
    chosen = logits.gather(1, tok[:, None]).squeeze(1)
    assert torch.all(chosen >= logits.max(1).values - 1e-2)
    assert torch.allclose(top, torch.softmax(logits, -1).amax(-1), atol=1e-3)
    assert torch.allclose(score, router_mlp_ref(h, *router), atol=1e-3)


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
