"""GPU-only: model loading on CUDA, where the checkpoint's tensors arrive on the CPU and the
model's parameters live on the device. Skipped on machines without CUDA."""
import os
import shutil

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from citer import Engine, SamplingParams  # noqa: E402


def test_a_tied_checkpoint_that_stores_its_head_loads_on_cuda(tmp_path, hf_models):
    """A tied config whose safetensors also store lm_head.weight (a copy of the embedding): the
    check that the copy is the embedding compares across devices, and the model matches the CPU's."""
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "m")
    shutil.copytree(hf_models["qwen2"][0], path)  # tied
    fn = os.path.join(path, "model.safetensors")
    state = load_file(fn)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, fn)
    p = SamplingParams(max_tokens=4, policy="slm", ignore_eos=True)
    gpu = Engine(path, device="cuda", dtype="float32", num_blocks=16, max_model_len=32).generate([[5, 6, 7]], p)
    cpu = Engine(path, num_blocks=16, max_model_len=32).generate([[5, 6, 7]], p)
    assert gpu[0].token_ids == cpu[0].token_ids
