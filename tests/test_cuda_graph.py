"""The CUDA-graph step on CPU: buckets, static buffers, padding lanes and the sink block.

EagerGraph stands in for torch.cuda.CUDAGraph (it re-runs the captured step on the
static buffers), so these tests check everything but the capture itself under the
Triton interpreter: an engine stepping through graphs gives the same tokens, routing,
scores and KV cache as the eager engine, padding writes only the sink block, and a new
router means new graphs. tests/test_kernels_gpu.py and test_cuda_graph_gpu.py replay
real graphs on a GPU."""
import pytest
import torch

from citer import Engine, SamplingParams
from citer.engine.cuda_graph import EagerGraph, batch_buckets, pick_bucket, query_len_buckets
from conftest import DEVICE, assert_all_free, random_prompts


def test_buckets():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert query_len_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert query_len_buckets(1) == [1]
    assert query_len_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert [pick_bucket([1, 2, 4, 5], n) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 5, None]


def test_static_inputs_share_one_buffer_without_overlap():
    from citer.engine.cuda_graph import StaticInputs

    fields = [("a", (3,), torch.int64, -1), ("b", (5,), torch.float32, 0.5), ("c", (2, 3), torch.int32, 7)]
    s = StaticInputs(fields, torch.device(DEVICE))
    assert s.offsets == {"a": 0, "b": 24, "c": 48} and s.nbytes == 72  # 8-byte aligned regions
    assert s.dev.a.tolist() == [-1] * 3 and s.dev.b.tolist() == [0.5] * 5 and s.dev.c.tolist() == [[7] * 3] * 2
    s.host.a[:] = torch.tensor([1, 2, 3])
    s.host.b[:] = torch.arange(5, dtype=torch.float32)
    s.host.c[:] = torch.arange(6, dtype=torch.int32).view(2, 3)
    s.copy(s.offsets["c"] + 3 * 4)  # through the first row of c only
    assert s.dev.a.tolist() == [1, 2, 3] and s.dev.b.tolist() == [0, 1, 2, 3, 4]
    assert s.dev.c.tolist() == [[0, 1, 2], [7, 7, 7]]


def _engine(hf_models, router_path, graphs: bool, backend: str = "torch") -> Engine:
    e = Engine(hf_models["qwen2"][0], hf_models["llama"][0], router_path, device=DEVICE, block_size=8,
               num_blocks=24, max_model_len=64, max_num_seqs=4, max_graph_query_len=4, backend=backend,
               enforce_eager=True)  # graphs built below, replayed eagerly
    if graphs:
        for runner in (e.core.slm, e.core.llm):
            runner.build_graphs(EagerGraph)
    return e


@pytest.fixture(scope="module")
def pairs(hf_models, router_path):
    """backend -> (eager, graphed) engines with identical histories (same blocks for the
    same requests), on the reference ops or on the Triton kernels (interpreted)."""
    cache = {}

    def get(backend):
        if backend not in cache:
            cache[backend] = tuple(_engine(hf_models, router_path, g, backend) for g in (False, True))
        return cache[backend]

    return get


def _same_kv(a: Engine, b: Engine) -> None:
    """Every block but the sink holds the same keys/values in both engines."""
    for name in ("slm", "llm"):
        for (ka, va), (kb, vb) in zip(getattr(a.core, name).kv_cache, getattr(b.core, name).kv_cache):
            torch.testing.assert_close(ka[:-1], kb[:-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(va[:-1], vb[:-1], rtol=1e-5, atol=1e-5)


CASES = {
    "slm": dict(policy="slm"),
    "llm": dict(policy="llm"),
    "random": dict(policy="random", llm_fraction=0.5),  # seeds from the engines (same history)
    "router": dict(policy="router", threshold=0.5),
    "sampled": dict(policy="random", llm_fraction=0.4, temperature=0.8),
    "top_p": dict(policy="slm", temperature=0.9, top_p=0.8, seed=6),  # graph body, eager head
    "speculative": dict(policy="speculative", num_draft_tokens=3),  # all-row catch-up graphs, rollbacks
    "spec_sampled": dict(policy="speculative", temperature=0.8, seed=3),  # graph bodies, full-logits heads
    "verify": dict(policy="random", llm_fraction=0.3, verify=True),
}
# under the (slow) interpreter, one case: decode and catch-up graphs, padding and tail lanes
PARAMS = [("torch", case) for case in CASES] + [("triton", "random")]


@pytest.mark.parametrize("backend,case", PARAMS)
def test_graphed_engine_equals_eager(pairs, backend, case):
    eager, graphed = pairs(backend)
    prompts = random_prompts(3, 2, 8, seed=len(case))  # 3 lanes: bucket 4 has a padding lane
    max_tokens = 5 if backend == "triton" else 8
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **CASES[case])
    ref = eager.generate(prompts, params)
    outs = graphed.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert [o.from_llm for o in outs] == [o.from_llm for o in ref]
    for o, r in zip(outs, ref):
        assert o.stats["slm_forward_tokens"] == r.stats["slm_forward_tokens"]
        assert o.stats["llm_forward_tokens"] == r.stats["llm_forward_tokens"]
        if case == "router":
            torch.testing.assert_close(torch.tensor(o.router_scores), torch.tensor(r.router_scores))
    _same_kv(eager, graphed)
    assert_all_free(graphed)
    slm_keys, llm_keys = set(graphed.core.slm.graphs.graphs), set(graphed.core.llm.graphs.graphs)
    if case != "llm":
        assert (4, 1, case == "router") in slm_keys
    if case in ("random", "sampled"):  # catch-ups of several tokens replayed a graph
        assert any(1 < k[1] <= 4 for k in llm_keys)
    if case in ("speculative", "verify"):  # verifying catch-ups: the head on every row
        assert any(len(k) == 4 for k in llm_keys)


def test_graph_step_names_its_devices(pairs):
    """The graph path makes no tensor on the default device (see test_engine's check)."""
    eager, graphed = pairs("torch")
    prompts = random_prompts(3, 2, 8, seed=13)
    params = SamplingParams(max_tokens=6, ignore_eos=True, policy="random", llm_fraction=0.5, temperature=0.7)
    ref = eager.generate(prompts, params)
    with torch.device("meta"):
        outs = graphed.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]


def test_padding_and_tail_lanes_use_the_sink(hf_models, router_path):
    e = _engine(hf_models, router_path, True)
    g = e.core.llm.graphs
    sink_slot = e.core.llm.sink_block * e.config.block_size
    e.add_request([5, 6, 7], SamplingParams(max_tokens=3, policy="llm", ignore_eos=True), request_id="a")
    e.step()  # a: 3-token prefill -> bucket (1, 4): lane 0 real, lane 1 the tail row
    assert g.dev.query_start_loc[:3].tolist() == [0, 3, 4]
    assert g.dev.slot_mapping[3].item() == sink_slot
    assert all(0 <= s < sink_slot for s in g.dev.slot_mapping[:3].tolist())
    e.add_request([8, 9], SamplingParams(max_tokens=3, policy="llm", ignore_eos=True), request_id="b")
    e.add_request([10, 11], SamplingParams(max_tokens=3, policy="llm", ignore_eos=True), request_id="c")
    e.step()  # a: 1 token, b and c: 2-token prefills -> bucket (4, 2): lane 3 padding, lane 4 tail
    assert g.dev.query_start_loc[:9].tolist() == [0, 1, 3, 5, 6, 8, 8, 8, 8]
    assert g.dev.seq_lens[3:8].tolist() == [1, 2, 0, 0, 0]
    assert g.dev.positions[5:8].tolist() == [0, 0, 1]
    assert g.dev.slot_mapping[5:8].tolist() == [sink_slot, sink_slot, sink_slot + 1]
    assert (g.dev.block_tables[3:8, :1] == e.core.llm.sink_block).all()
    while e.has_unfinished_requests():
        e.step()
    assert_all_free(e)


def test_new_router_means_new_graphs(hf_models, router_path):
    e = _engine(hf_models, router_path, True)
    params = SamplingParams(max_tokens=3, policy="router", threshold=0.5, ignore_eos=True)
    first = e.generate([[3, 4, 5]], params)[0]
    g = e.core.slm.graphs
    assert g.router[0] is e.router.params[0]
    e.set_router(router_path)  # same weights, new tensors: graphs must not read the old ones
    assert g.router[0] is not e.router.params[0]
    again = e.generate([[3, 4, 5]], params)[0]
    assert g.router[0] is e.router.params[0]
    assert again.token_ids == first.token_ids and again.router_scores == pytest.approx(first.router_scores)


def test_capture_all_up_front(hf_models, router_path):
    """Engine.capture_cuda_graphs captures every bucket (largest first); serving then
    captures nothing more and gives the eager engine's tokens."""
    e = _engine(hf_models, router_path, True)
    assert e.capture_cuda_graphs() == 9 + 3 + 3  # LLM (1,2,4)x(1,2,4); SLM (1,2,4) without and with router
    assert e.capture_cuda_graphs() == 0
    slm, llm = dict(e.core.slm.graphs.graphs), dict(e.core.llm.graphs.graphs)
    assert next(iter(llm)) == (4, 4, False)  # the largest bucket first: it sizes the shared pool
    prompts = random_prompts(3, 2, 8, seed=12)
    for policy in (dict(policy="random", llm_fraction=0.5), dict(policy="router", threshold=0.5)):
        params = SamplingParams(max_tokens=6, ignore_eos=True, **policy)
        ref = _engine(hf_models, router_path, False).generate(prompts, params)
        assert [o.token_ids for o in e.generate(prompts, params)] == [o.token_ids for o in ref]
    assert e.core.slm.graphs.graphs == slm and e.core.llm.graphs.graphs == llm  # the same graph objects


def test_graph_step_needs_a_token_per_sequence(hf_models, router_path):
    e = _engine(hf_models, router_path, True)
    with pytest.raises(ValueError, match="at least one new token"):
        e.core.llm.graphs.bucket([0])


def test_token_cap_on_graph_buckets(hf_models, router_path):
    from citer.engine.cuda_graph import MAX_GRAPH_TOKENS, StepGraphs

    runner = _engine(hf_models, router_path, False).core.llm
    g = StepGraphs([1, 64, 128], [1, 16, 32], 8, runner.sink_block, runner.block_size, runner.device, EagerGraph)
    assert g.bucket([1] * 64) == (64, 1) and g.bucket([20] * 64) == (64, 32)
    assert 128 * 32 > MAX_GRAPH_TOKENS and g.bucket([20] * 100) is None  # 4096 rows: eager


def test_mixed_sampled_and_verifying_rows_under_graphs(hf_models, router_path):
    """A sampled request next to a greedy verifying one in the same LLM batch keeps its
    own seeded samples under graphs (the all-row graph's head is greedy; the review's
    finding); and capture_cuda_graphs(speculative=True) also captures the SLM's 2-token
    and the LLM's all-row buckets."""
    eager, graphed = (_engine(hf_models, router_path, g) for g in (False, True))
    prompts = random_prompts(2, 3, 8, seed=21)
    params = [SamplingParams(max_tokens=8, ignore_eos=True, policy="speculative", num_draft_tokens=2),
              SamplingParams(max_tokens=8, ignore_eos=True, policy="llm", temperature=0.9, seed=5)]
    ref = eager.generate(prompts, params)
    assert [o.token_ids for o in graphed.generate(prompts, params)] == [o.token_ids for o in ref]
    assert ref[1].token_ids == eager.generate([prompts[1]], params[1])[0].token_ids  # and equals it alone
    e = _engine(hf_models, router_path, True)
    assert e.capture_cuda_graphs(speculative=True) == 9 + 6 + 3 * 2 + 3 * 2  # + LLM all-row, + SLM L=2
