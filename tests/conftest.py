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
