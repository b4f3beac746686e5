"""Shared fixtures. GPU-marked tests skip on machines without CUDA (CI has none)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # the light client's tests run without torch
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the GPU box)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
