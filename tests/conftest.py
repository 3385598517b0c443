"""Shared fixtures: tiny seeded models written as real HF folders (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from peers.tiny_models import calibration_ids, save_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def examples():
    return calibration_ids(8, 64)
