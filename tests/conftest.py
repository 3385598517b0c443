"""Shared fixtures: tiny seeded models written as real HF folders (no downloads)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peers.tiny_models import calibration_ids, save_tiny_model

import quantpress


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Test tensors are tiny: intra-op threads only add sync cost, ~10x on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="module")
def loaded():
    """The bundled model loaded for inference, once per test module: an engine attaches its
    attention function to the model, so modules do not share one."""
    return quantpress.load(quantpress.bundled_model_dir())


@pytest.fixture(scope="session")
def examples():
    return calibration_ids(8, 64)
