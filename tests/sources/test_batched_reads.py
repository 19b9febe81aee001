"""Adjacent small tensors of a unit are fetched in one ranged read each run, with the same bytes."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from flows.plan import build_plan
from flows.recipe import Recipe
from infra.safetensors import TensorReader, build_catalog
from infra.storage import open_storage
from infra.storage.local import LocalStorage
from workers.batched_reads import BatchedReader


class CountingStorage(LocalStorage):
    """The real local storage, counting the ranged reads and maps it serves."""

    reads = 0
    maps = 0

    def read_range_into(self, key: str, offset: int, buffer: memoryview) -> None:
        type(self).reads += 1
        super().read_range_into(key, offset, buffer)

    def map_range(self, key: str, offset: int, length: int) -> memoryview | None:
        type(self).maps += 1
        return super().map_range(key, offset, length)


def test_many_small_experts_are_read_in_a_few_spans(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.0.mlp.experts.{e}.{p}.weight": torch.randn(64, 64, generator=generator)
               .to(torch.bfloat16) for e in range(64) for p in ("gate_proj", "up_proj", "down_proj")}
    tensors["model.embed_tokens.weight"] = torch.randn(1024, 1024, generator=generator).to(torch.bfloat16)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    storage = open_storage(str(tmp_path))
    plan = build_plan(build_catalog(storage), Recipe.preset("W4A16"))
    unit = plan.units[0]
    counting = CountingStorage(tmp_path)
    catalog = build_catalog(storage)
    with BatchedReader(counting, unit.jobs, max_span=64 << 10) as batched, TensorReader(storage) as plain:
        for job in unit.jobs:
            info = catalog.tensors[job.name].info
            assert torch.equal(batched.read(job.file, info), plain.read(job.file, info)), job.name
    # 192 expert tensors of 8 KiB in spans of <= 64 KiB, plus the 2 MiB embedding on its own
    # (mapped, not read: it is over the reader's map_min_bytes).
    assert batched.span_reads == 24 and CountingStorage.reads == 24 and CountingStorage.maps == 1
