"""Faults: a killed driver resumes, a killed worker is retried, units run across Ray nodes,
credentials that expire mid-run stop it.

These start their own Ray (a multi-node local cluster, or a CLI subprocess), so the session's
local Ray is shut down first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from flows.pipeline import plan_conversion, run_conversion
from flows.recipe import Recipe
from infra.storage import open_storage
from tests.flows.conftest import file_digests, upload_dir
from tests.flows.test_cli import run_cli
from tests.infra.fault_proxy import FaultProxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def medium_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big enough that units take a while (and a kill lands mid-run), small enough for CI."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("medium")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="20MB")
    return path


@pytest.fixture(scope="module")
def reference(medium_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Digests of an uninterrupted conversion, in-process with a fresh local Ray."""
    import ray

    ray.shutdown()
    dest = tmp_path_factory.mktemp("reference") / "out"
    run_conversion(str(medium_llama), str(dest), Recipe.preset("W4A16"), shard_size=8_000_000)
    ray.shutdown()
    return file_digests(open_storage(dest))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def test_killed_driver_resumes_and_gives_identical_bytes(medium_llama, reference, tmp_path):
    dest = tmp_path / "out"
    command = _cli("convert", str(medium_llama), str(dest), "--scheme", "W4A16",
                   "--shard-size", "8MB", "--no-prefect")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    process = subprocess.Popen(command, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    staging_units = dest / ".staging"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(staging_units.glob("*/units/*.json"))) < 2:
        assert process.poll() is None, process.stdout.read().decode()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
    process.wait()
    finished_before = len(list(staging_units.glob("*/units/*.json")))
    assert finished_before >= 2
    assert not (dest / "_QUANTFLEET_PUBLISHED.json").exists()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    reused = int(rerun.stdout.split(" reused from an earlier run")[0].rsplit(" ", 1)[-1])
    assert reused >= finished_before
    assert file_digests(open_storage(dest)) == reference


def test_sigterm_stops_a_conversion_cleanly_and_the_rerun_resumes(medium_llama, tmp_path):
    # What a scheduler (Kubernetes, Slurm, systemd) sends to stop a job, in the default Prefect
    # mode. It printed a SystemError traceback (Prefect's TerminationSignal raised inside Ray's
    # wait) and exited 1; without Prefect it exited 15 saying nothing.
    from tests.flows.test_cli import processes_started_with

    dest = tmp_path / "out"
    command = _cli("convert", str(medium_llama), str(dest), "--scheme", "W4A16", "--shard-size", "2MB")
    marker = f"QUANTFLEET_TEST_RUN={tmp_path.name}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PREFECT_API_URL": "",
           "PREFECT_HOME": str(tmp_path / "prefect"), "QUANTFLEET_TEST_RUN": tmp_path.name}
    stopped = "quantfleet: stopped (SIGTERM); re-run the same command to resume"

    # While Ray starts (seconds, under a handler of Ray's own that exited 15 silently): its GCS
    # server, started by ray.init, is up.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any("gcs_server" in _name(pid) for pid in processes_started_with(marker)):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out + err
    assert err.strip().splitlines()[-1] == stopped and "Traceback" not in err, err

    # Mid-conversion, during the flow run.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list((dest / ".staging").glob("*/units/*.json")):
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out + err
    assert err.strip().splitlines()[-1] == stopped and "Traceback" not in err, err
    assert processes_started_with(marker) == []  # Ray and Prefect's server stopped with it
    staged = len(list((dest / ".staging").glob("*/units/*.json")))
    assert staged >= 1 and not (dest / "_QUANTFLEET_PUBLISHED.json").exists()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    reused = int(rerun.stdout.split(" reused from an earlier run")[0].rsplit(" ", 1)[-1])
    assert reused >= staged and (dest / "_QUANTFLEET_PUBLISHED.json").exists()


def _name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.NoSuchProcess:
        return ""


def _kill_one_convert_worker(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first Ray worker process seen running a convert task."""
    while not stop.is_set() and not killed:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            title = " ".join(proc.info.get("cmdline") or [])
            if title.startswith("ray::convert") or "ray::_convert_on_node" in title:
                try:
                    proc.send_signal(signal.SIGKILL)
                    killed.append(proc.info["pid"])
                except psutil.NoSuchProcess:
                    continue
                return
        time.sleep(0.02)


def test_units_spread_over_nodes_and_a_killed_worker_is_retried(medium_llama, reference, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
        dest = tmp_path / "out"
        stop, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_one_convert_worker, args=(stop, killed))
        killer.start()
        try:
            run_conversion(str(medium_llama), str(dest), Recipe.preset("W4A16"), shard_size=8_000_000)
        finally:
            stop.set()
            killer.join()
        assert killed, "no convert task was seen running"
        assert file_digests(open_storage(dest)) == reference

        # The spread is checked in a run of its own: with a worker killed, the other node could
        # finish every unit before the killed one's node had a new worker. Undisturbed, the first
        # two units run at once, one per one-CPU node.
        nodes: set[str] = set()
        spread = run_conversion(
            str(medium_llama), str(tmp_path / "spread"), Recipe.preset("W4A16"), shard_size=8_000_000,
            on_done=lambda unit, result: nodes.add(result.node),
        )
        assert spread.units > 2
        assert len(nodes) == 2  # both worker nodes ran units; the zero-CPU head ran none
        assert file_digests(open_storage(tmp_path / "spread")) == reference
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize(("budget", "kept"), [
    (("--target-bits", "5"), "Nothing was converted: renew them (a session token expires after its set "
                             "hours) and run the same command again"),
    (("--scheme", "W8A16"), "The units finished before stay staged: renew them (a session token expires "
                            "after its set hours) and run the same command again to resume"),
], ids=["measuring", "converting"])
def test_credentials_that_expire_mid_run_stop_it_in_one_clear_message(
    tiny_llama, s3, tmp_path, budget, kept  # noqa: ANN001
) -> None:
    # A session token (STS, SSO) runs out hours into a run on object storage: every read is then
    # refused. The run stops at the first unit that says so, in one message that says why and what
    # to do; the units still queued are not started. Mixed precision measures first (nothing staged
    # yet), a plain scheme converts at once. The CLI's own Ray, so its workers read through the proxy.

    source = f"s3://{s3.create_bucket()}/llama"
    upload_dir(tiny_llama, open_storage(source))
    shard = 200_000  # 7 units to measure, 13 to convert: more than run at once on 2 cores
    mixed = budget[0] == "--target-bits"
    plan = plan_conversion(source, Recipe.preset("W4A16" if mixed else budget[1]), shard_size=shard)
    units = sum(1 for u in plan.units if not mixed or any(j.scheme is not None for j in u.jobs))
    dest = tmp_path / "out"
    with FaultProxy(s3.host, s3.port) as proxy:
        # Planning reads each file's header (from byte 0) and succeeds; every tensor read is refused.
        proxy.add("expired", method="GET", path=r"\.safetensors", range=r"bytes=[1-9]", times=10_000)
        env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": "",
               "QUANTFLEET_S3_ENDPOINT_URL": proxy.endpoint_url, "RAY_ADDRESS": ""}
        result = run_cli("convert", source, str(dest), *budget, "--shard-size", str(shard), env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    failed = [line for line in lines if line.endswith("ExpiredToken: The provided token has expired.")]
    assert 1 <= len(failed) < units and len(lines) == len(failed) + 1, result.stderr  # the run stopped
    assert lines[-1] == (f"  - {units - len(failed)} more unit(s) not started: the storage refuses the "
                         f"credentials. {kept}"), result.stderr
    assert not (dest / "_QUANTFLEET_PUBLISHED.json").exists()
