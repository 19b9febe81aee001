"""The pipelined unit loop: the shard's bytes and incremental SHA-256 whatever the write order,
reads handed out in order under a byte budget, failures surfaced, not swallowed."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import torch

from infra.safetensors import TensorInfo, TensorReader
from infra.storage import open_storage
from workers.errors import UnitFailed
from workers.pipeline import Prefetcher, ShardSink, run_pipelined
from workers.units import TensorJob


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("hold_bytes", [0, 1 << 10, 1 << 30], ids=["read-back", "some-held", "all-held"])
def test_sink_hashes_out_of_order_writes_like_the_file(tmp_path: Path, hold_bytes: int) -> None:
    rng = random.Random(hold_bytes)
    sizes = [rng.randrange(1, 5000) for _ in range(200)]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    size = sum(sizes)
    chunks = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in sizes]
    order = list(range(len(sizes)))
    rng.shuffle(order)
    path = tmp_path / "shard"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, size)
        sink = ShardSink(fd, size, torch.device("cpu"), budget_bytes=4096, hold_bytes=hold_bytes)
        for i in order:
            assert sink.put(chunks[i], offsets[i]) == sizes[i]
        digest = sink.finish()
    finally:
        os.close(fd)
    assert path.read_bytes() == torch.cat(chunks).numpy().tobytes()
    assert digest == _file_sha(path)


@pytest.mark.parametrize("origin_dir", ["same", "shm"], ids=["same-filesystem", "other-filesystem"])
def test_sink_copies_kept_bytes_from_their_origin_file_and_hashes_them(
    tmp_path: Path, origin_dir: str
) -> None:
    # Parts larger than the writer's pieces, put out of order, each copied file to file from the
    # source (copy_file_range, or pwrite where the kernel refuses between these files).
    root = Path("/dev/shm") if origin_dir == "shm" and Path("/dev/shm").is_dir() else tmp_path
    source = root / f"qf-test-origin-{os.getpid()}"
    generator = torch.Generator().manual_seed(1)
    sizes = [(32 << 20) + 4097, 5000, 1, (1 << 20) + 3]
    data = torch.randint(0, 256, (sum(sizes) + 777,), dtype=torch.uint8, generator=generator)
    source.write_bytes(data.numpy().tobytes())
    try:
        reader = TensorReader(open_storage(root))
        starts = [777 + sum(sizes[:i]) for i in range(len(sizes))]  # where each part lies in the source
        offsets = [sum(sizes[i + 1 :]) for i in range(len(sizes))]  # in the shard: reversed order
        path = tmp_path / "shard"
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        try:
            os.ftruncate(fd, sum(sizes))
            sink = ShardSink(fd, sum(sizes), torch.device("cpu"), budget_bytes=8 << 20, hold_bytes=0)
            for size, start, offset in zip(sizes, starts, offsets, strict=True):
                info = TensorInfo(name="t", dtype="U8", shape=(size,), begin=start, end=start + size)
                tensor = reader.read(source.name, info)  # a map of the source, for the big parts
                assert sink.put(tensor, offset, origin=(source, start)) == size
            digest = sink.finish()
        finally:
            os.close(fd)
            reader.close()
        expected = b"".join(
            data[start : start + size].numpy().tobytes()
            for size, start in reversed(list(zip(sizes, starts, strict=True)))
        )
        assert path.read_bytes() == expected
        assert digest == _file_sha(path)
    finally:
        source.unlink()


def test_sink_refuses_a_shard_with_unwritten_bytes(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "shard", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 100)
        sink = ShardSink(fd, 100, torch.device("cpu"), budget_bytes=64, hold_bytes=64)
        sink.put(torch.zeros(40, dtype=torch.uint8), 0)
        with pytest.raises(UnitFailed, match="not all written"):
            sink.finish()
    finally:
        os.close(fd)


def _jobs(tmp_path: Path, count: int) -> tuple[list[TensorJob], list[torch.Tensor]]:
    from safetensors.torch import save_file

    tensors = {f"t{i}": torch.full((64, 16 * (i + 1)), float(i), dtype=torch.bfloat16) for i in range(count)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    from infra.safetensors import build_catalog

    catalog = build_catalog(open_storage(tmp_path))
    entries = sorted(catalog.tensors.values(), key=lambda e: e.info.begin)
    jobs = [
        TensorJob(e.info.name, e.file, e.info.begin, e.info.end, e.info.dtype, e.info.shape) for e in entries
    ]
    return jobs, [tensors[j.name] for j in jobs]


def test_prefetcher_hands_out_tensors_in_order_under_a_small_budget(tmp_path: Path) -> None:
    jobs, expected = _jobs(tmp_path, 6)
    with TensorReader(open_storage(tmp_path)) as reader:
        # A budget smaller than any tensor: still one at a time, never stuck.
        prefetch = Prefetcher(reader, jobs, torch.device("cpu"), budget_bytes=1)
        try:
            for job, tensor in zip(jobs, expected, strict=True):
                info = _info(job)
                assert torch.equal(prefetch.read(job.file, info), tensor)
            with pytest.raises(IndexError):
                prefetch.read(jobs[0].file, _info(jobs[0]))
        finally:
            prefetch.close()


def _info(job: TensorJob):  # noqa: ANN202 - a TensorInfo
    from infra.safetensors import TensorInfo

    return TensorInfo(name=job.name, dtype=job.dtype, shape=job.shape, begin=job.begin, end=job.end)


def test_run_pipelined_writes_every_part_and_stops_on_a_failing_job(tmp_path: Path) -> None:
    jobs, expected = _jobs(tmp_path, 5)
    header = b"HEADER.."
    sizes = [t.numel() * 2 for t in expected]
    size = len(header) + sum(sizes)
    offsets = {j.name: len(header) + sum(sizes[:i]) for i, j in enumerate(jobs)}

    def copy(job: TensorJob, reader, sink) -> int:  # noqa: ANN001 - the pipeline's duck types
        return sink.put(reader.read(job.file, _info(job)), offsets[job.name])

    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, size)
        with TensorReader(open_storage(tmp_path)) as reader:
            results, sha256 = run_pipelined(
                jobs, reader, fd, header, size, torch.device("cpu"), copy,
                read_budget=1 << 20, write_budget=1 << 20, hold_budget=0,
            )

            def failing(job: TensorJob, reader, sink) -> int:  # noqa: ANN001
                if job is jobs[2]:
                    raise ValueError("bad tensor t2")
                return copy(job, reader, sink)

            with pytest.raises(ValueError, match="bad tensor t2"):
                run_pipelined(
                    jobs, reader, fd, header, size, torch.device("cpu"), failing,
                    read_budget=1, write_budget=1, hold_budget=0,
                )
    finally:
        os.close(fd)
    assert results == sizes
    assert path.read_bytes()[: len(header)] == header
    assert sha256 == hashlib.sha256(header + torch.cat([t.flatten() for t in expected]).view(torch.uint8)
                                    .numpy().tobytes()).hexdigest()
