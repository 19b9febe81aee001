"""Storage and safetensors I/O benchmark: read throughput (local and loopback moto S3) and peak
RSS of streaming a 4 GiB shard through the writer.

    .venv/bin/python benchmarks/io.py            # prints a table, updates docs/benchmarks.md

Temporary files go to a temp folder that is removed at the end (about 4.7 GiB at peak).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._doc import best_seconds, peak_rss_bytes, update_section  # noqa: E402
from infra.safetensors import TensorReader, TensorSpec, build_catalog, open_safetensors_writer
from infra.storage import S3Options, S3Storage, Storage, open_storage

__all__ = ["main"]

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Storage and safetensors I/O"
COMMAND = ".venv/bin/python benchmarks/io.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """moto in its own process, so its CPU use does not share our GIL."""
    port = _free_port()
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def _write_file(store: Storage, key: str, tensors: dict[str, torch.Tensor]) -> None:
    specs = [TensorSpec.of(n, t) for n, t in tensors.items()]
    with open_safetensors_writer(store, key, specs) as w:
        for name in w.order:
            w.write(name, tensors[name])
        w.close()


def _bench_reads(
    store: Storage, label: str, *, chunk_bytes: int, small_files: int, reps: int
) -> list[tuple[str, str, str]]:
    big = {"big": torch.ones(256 * MiB, dtype=torch.bfloat16)}  # 512 MiB
    _write_file(store, "big/model.safetensors", big)
    del big
    g = torch.Generator().manual_seed(0)
    per_file = 2000 // small_files
    for f in range(small_files):
        small = {
            f"t.{i:04d}": torch.randint(0, 255, (64 * 1024,), dtype=torch.uint8, generator=g)
            for i in range(f * per_file, (f + 1) * per_file)
        }
        _write_file(store, f"small/model-{f:04d}.safetensors", small)
    del small
    rows = []
    with TensorReader(store, max_concurrent_reads=8, chunk_bytes=chunk_bytes) as reader:
        cat = build_catalog(store, "big")
        e = cat.tensors["big"]
        secs = best_seconds(lambda: reader.read(e.file, e.info), reps)
        rows.append((label, "1 x 512 MiB tensor", f"{512 / secs:,.0f} MiB/s ({secs:.2f} s)"))
        cat = build_catalog(store, "small")
        entries = list(cat.tensors.values())
        with ThreadPoolExecutor(8) as pool:

            def read_all() -> None:
                list(pool.map(lambda x: reader.read(x.file, x.info), entries))

            secs = best_seconds(read_all, reps)
        rows.append(
            (
                label,
                f"2,000 x 64 KiB tensors in {small_files} file(s), 8 threads",
                f"{125 / secs:,.0f} MiB/s, {2000 / secs:,.0f} tensors/s ({secs:.2f} s)",
            )
        )
    return rows


def _rss_child(folder: str, count: int, mib: int) -> None:
    """Child: stream `count` tensors of `mib` MiB (generated on the fly) to a local shard."""
    store = open_storage(folder)
    cols = 16384
    shape = (mib * MiB // 2 // cols, cols)  # bf16
    specs = [TensorSpec(name=f"layer.{i:03d}.weight", dtype="BF16", shape=shape) for i in range(count)]
    base = peak_rss_bytes()
    t0 = time.perf_counter()
    with open_safetensors_writer(store, "shard.safetensors", specs) as w:
        for i, name in enumerate(w.order):
            t = torch.empty(shape, dtype=torch.bfloat16).fill_(float(i))
            w.write(name, t)
            del t  # the writer keeps nothing: only this tensor is ever alive
        res = w.close()
    secs = time.perf_counter() - t0
    peak = peak_rss_bytes()
    print(f"{base} {peak} {res.size} {secs}")


def _bench_rss(tmp: Path, count: int, mib: int = 256) -> tuple[str, str, str]:
    folder = tmp / f"rss-{count}"
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(folder), str(count), str(mib)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    base, peak, size, secs = int(out[0]), int(out[1]), int(out[2]), float(out[3])
    shutil.rmtree(folder, ignore_errors=True)
    target = 1.5 * mib * MiB + 200 * MiB
    verdict = "meets" if peak < target else "MISSES"
    return (
        "local",
        f"stream {count} x {mib} MiB ({size / 2**30:.1f} GiB shard) through the writer",
        f"peak RSS {peak / MiB:,.0f} MiB (after imports {base / MiB:,.0f} MiB; {verdict} target "
        f"{target / MiB:,.0f} MiB); {size / MiB / secs:,.0f} MiB/s incl. fsync",
    )


def _table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| backend | workload | result |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def _update_doc(table: str) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    body = (
        f"Measured with `{COMMAND}` on {time.strftime('%Y-%m-%d')} ({machine}; torch "
        f"{torch.__version__}). S3 is moto 5.2.5 in its own process on loopback, so its figures "
        "measure our client path plus moto's Python server, not a real S3 network. Reads use "
        "`TensorReader(max_concurrent_reads=8)`; locally with 16 MiB chunks read concurrently into "
        "one tensor buffer, best of 3. moto 5.2.5 copies the WHOLE object for every ranged GET, so "
        "the S3 rows use one GET per tensor and small files (100 files of 20 tensors), one run "
        "each; on moto they bound our client path from below, not S3's. The RSS target is 1.5 x the largest "
        "tensor + 200 MB; peak RSS is the child process's VmHWM (ru_maxrss would inherit the parent's "
        "peak across fork+exec); two shard sizes show that the peak does not grow with the shard.\n\n"
        f"{table}\n"
    )
    update_section(SECTION.removeprefix("## "), body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rss-child", nargs=3, metavar=("FOLDER", "COUNT", "MIB"))
    parser.add_argument("--no-doc", action="store_true", help="print only; leave the docs alone")
    args = parser.parse_args()
    if args.rss_child:
        _rss_child(args.rss_child[0], int(args.rss_child[1]), int(args.rss_child[2]))
        return
    for k, v in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ[k] = v
    tmp = Path(tempfile.mkdtemp(prefix="qf-bench-"))
    moto, endpoint = _start_moto()
    try:
        local = open_storage(tmp / "local", fsync=False)
        rows = _bench_reads(local, "local", chunk_bytes=16 * MiB, small_files=1, reps=3)
        s3 = S3Storage("bench", "io", S3Options(endpoint_url=endpoint, max_pool_connections=16))
        s3.client.create_bucket(Bucket="bench")
        # moto re-reads a whole object for every ranged GET, so S3 runs use one GET per tensor
        # and 20-tensor files (1.25 MiB); otherwise the figures would measure moto alone.
        rows += _bench_reads(s3, "s3 (moto, loopback)", chunk_bytes=512 * MiB, small_files=100, reps=1)
        shutil.rmtree(tmp / "local", ignore_errors=True)
        rows.append(_bench_rss(tmp, 16))
        rows.append(_bench_rss(tmp, 8))
    finally:
        moto.terminate()
        moto.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    table = _table(rows)
    print(table)
    if not args.no_doc:
        _update_doc(table)


if __name__ == "__main__":
    main()
