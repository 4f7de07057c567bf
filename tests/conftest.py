import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from tests.fixtures.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    from tests.fixtures.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """Qwen2 (Qwen2.5 layout: q/k/v biases, RoPE theta 1e6), untied as Qwen2.5-Coder's GGUFs load; intermediate
    128 so that every target's blocks (up to 64, the qnn target's) divide down_proj's K."""
    from tests.fixtures.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2", tie=False, intermediate=128)


@pytest.fixture(scope="session")
def tiny_phi3_dir(tmp_path_factory):
    """Phi-3 (fused qkv_proj and gate_up_proj, no biases), untied as Phi-3-mini; intermediate 128 as Qwen2's."""
    from tests.fixtures.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "phi3", "phi3", tie=False, intermediate=128)
