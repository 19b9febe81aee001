"""Fixtures for pipeline tests: a loopback S3 server, a local Ray, real and tiny real models.

The S3 endpoint and dummy credentials are put in the environment before Ray starts, so Ray's
worker processes (children of this process) reach the same loopback server.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from flows.cli import bundled_model_path
from infra.storage import Storage, open_storage
from tests.s3_server import MotoS3, aws_test_env

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")  # see flows/cli.py
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")


@pytest.fixture(scope="session")
def s3() -> Iterator[MotoS3]:
    with aws_test_env(), MotoS3() as server:
        os.environ["QUANTFLEET_S3_ENDPOINT_URL"] = server.endpoint_url
        try:
            yield server
        finally:
            os.environ.pop("QUANTFLEET_S3_ENDPOINT_URL", None)


@pytest.fixture(scope="session")
def local_ray(s3: MotoS3) -> Iterator[None]:
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cli_env(local_ray: None) -> Iterator[dict[str, str]]:
    """The environment for the CLI run as a user runs it, in its own process: a real (temporary)
    Prefect server for the module, and the test session's Ray."""
    import ray
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield {"PREFECT_API_URL": str(PREFECT_API_URL.value()),
               "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


@pytest.fixture(scope="session")
def minilm() -> str:
    return bundled_model_path()


def save_tiny_model(kind: str, path: Path, seed: int = 0) -> Path:
    """A small transformers model built from a config, saved in several safetensors shards."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    else:
        # SmolLM2-like width: 576 is not a multiple of 128, so W4A16 uses group 64 there.
        config = Qwen2Config(
            vocab_size=1024, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256,
            tie_word_embeddings=False,
        )
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="2MB")
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("qwen", tmp_path_factory.mktemp("qwen"))


@contextmanager
def mounted_tmpfs(mount: Path, options: str, why: str) -> Iterator[Path]:
    """A tmpfs mounted at the fresh folder `mount` with `options` (unmounted afterwards); the test
    is skipped, saying `why` it needs one, where mounting is not allowed (it needs root)."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"{why}, and mounting a tmpfs failed here: {(done.stderr or done.stdout).strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def upload_dir(local: Path, storage: Storage) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.put_bytes(path.relative_to(local).as_posix(), path.read_bytes())


def download_dir(storage: Storage, local: Path) -> Path:
    for info in storage.list(""):
        target = local / info.key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(info.key))
    return local


def _without_run_records(key: str, data: bytes) -> bytes:
    """The artifact without what records how the run went (unit times, devices, nodes)."""
    import json

    name = key.rsplit("/", 1)[-1]
    if name == "quantfleet.json":
        manifest = json.loads(data)
        manifest["units"] = [{k: u[k] for k in ("index", "file", "bytes_in", "bytes_out")}
                             for u in manifest["units"]]
        return json.dumps(manifest, sort_keys=True).encode()
    if name in ("report.md", "README.md"):
        text = data.decode()
        return text.split("## Where it ran")[0].encode()
    return data


def file_digests(storage: Storage) -> dict[str, str]:
    """sha256 of every published file (the staging area excluded); the manifest and report are
    hashed without their run records, the marker (which lists their checksums) by its keys."""
    import hashlib
    import json

    digests = {}
    for info in storage.list(""):
        if info.key.startswith(".staging"):
            continue
        data = storage.read_bytes(info.key)
        if info.key.endswith("_QUANTFLEET_PUBLISHED.json"):
            data = json.dumps(sorted(json.loads(data).get("files", {}))).encode()
        digests[info.key] = hashlib.sha256(_without_run_records(info.key, data)).hexdigest()
    return digests


def s3_storage(s3: MotoS3, prefix: str) -> tuple[str, Storage]:
    bucket = s3.create_bucket()
    uri = f"s3://{bucket}/{prefix}"
    return uri, open_storage(uri)
