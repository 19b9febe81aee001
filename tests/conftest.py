"""Suite-wide settings: GPU tests skip, with the reason, where no CUDA device exists."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU; run on a GPU machine (benchmarks/gpu_check.py checks the same and "
        "measures throughput)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
