"""sync into the loopback S3 bucket: layout, skip when unchanged, new version on new weights,
LATEST, failures that do not stop the others, and overlapping runs that publish once."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

import flows.sync as sync_module
from flows.sync import SyncSummary, run_sync
from flows.versions import LATEST_NAME, find_checkpoints, read_latest, verify_uri
from infra.publish import DEFAULT_MARKER
from infra.storage import open_storage
from tests.flows.conftest import save_tiny_model, upload_dir
from tests.s3_server import MotoS3

pytestmark = pytest.mark.usefixtures("local_ray")
SHARDS = 1_000_000  # three shards and an index for tiny Llama's W8A16


def _versions(dest_uri: str, model: str, recipe: str) -> list[str]:
    storage = open_storage(dest_uri)
    suffix = "/" + DEFAULT_MARKER
    return sorted(i.key.split("/")[2] for i in storage.list(f"{model}/{recipe}/") if i.key.endswith(suffix))


def _only(summary: SyncSummary, status: str) -> None:
    assert [o.status for o in summary.outcomes] == [status], summary.text()


def test_sync_publishes_versions_and_moves_latest(s3: MotoS3, tiny_llama: Path, tmp_path: Path) -> None:
    incoming, bucket = s3.create_bucket(), s3.create_bucket()
    source, dest = f"s3://{incoming}/", f"s3://{bucket}/"
    upload_dir(tiny_llama, open_storage(f"{source}llama"))

    first = run_sync(source, dest, ["W4A16"])
    _only(first, "converted")
    version = first.outcomes[0].version
    assert version and first.outcomes[0].latest_moved
    store = open_storage(dest)
    keys = {i.key for i in store.list(f"llama/W4A16/{version}/")}
    names = {k.rsplit("/", 1)[-1] for k in keys}
    assert {"config.json", "quantfleet.json", "README.md", "report.md", DEFAULT_MARKER,
            "model.safetensors.index.json", "tokenizer.json"} <= names or {
        "config.json", "quantfleet.json", "README.md", DEFAULT_MARKER} <= names
    assert not any("/.staging/" in k for k in keys)  # cleaned up after the commit
    manifest = json.loads(store.read_bytes(f"llama/W4A16/{version}/quantfleet.json"))
    assert manifest["plan_id"] == version and manifest["source"]["uri"] == f"{source}llama"
    card = store.read_bytes(f"llama/W4A16/{version}/README.md").decode()
    assert "bits per weight" in card and f"quantfleet verify {dest}llama/W4A16/{version}" in card
    latest = read_latest(store, "llama", "W4A16")
    assert latest is not None and latest.version == version
    assert all(r.ok for r in verify_uri(f"{dest}llama/W4A16")), "LATEST's version verifies"

    # Unchanged source: nothing converted, nothing written (LATEST keeps its bytes).
    before = store.read_bytes(f"llama/W4A16/{LATEST_NAME}")
    again = run_sync(source, dest, ["W4A16"])
    _only(again, "skipped")
    assert not again.outcomes[0].latest_moved
    assert store.read_bytes(f"llama/W4A16/{LATEST_NAME}") == before

    # New weights under the same names: a new version, LATEST moves, the old one stays intact.
    changed = save_tiny_model("llama", tmp_path / "v2", seed=1)
    src = open_storage(f"{source}llama")
    for path in sorted(changed.glob("*.safetensors")):
        src.put_bytes(path.name, path.read_bytes())
    third = run_sync(source, dest, ["W4A16"])
    _only(third, "converted")
    assert third.outcomes[0].version != version
    assert "copied" not in third.outcomes[0].reason  # new weights: converted, not staged from LATEST
    assert _versions(dest, "llama", "W4A16") == sorted([version, third.outcomes[0].version or ""])
    latest = read_latest(store, "llama", "W4A16")
    assert latest is not None and latest.version == third.outcomes[0].version
    assert all(r.ok for r in verify_uri(dest)) and len(verify_uri(dest)) == 2


def test_one_failing_model_does_not_stop_the_others(tiny_llama: Path, tmp_path: Path) -> None:
    source = tmp_path / "incoming"
    shutil.copytree(tiny_llama, source / "good")
    (source / "broken").mkdir()
    (source / "broken" / "config.json").write_text("{}")
    (source / "broken" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    (source / "notes").mkdir()
    (source / "notes" / "config.json").write_text("{}")  # no weights: not a checkpoint
    assert [c.name for c in find_checkpoints(str(source))] == ["broken", "good"]

    summary = run_sync(str(source), str(tmp_path / "bucket"), ["W8A16"], max_parallel=2)
    status = {o.model: o for o in summary.outcomes}
    assert status["good"].status == "converted", summary.text()
    assert status["broken"].status == "failed"
    assert "HeaderError" in status["broken"].reason or "header" in status["broken"].reason.lower()
    assert "1 converted, 0 skipped, 1 failed" in summary.headline()
    assert "broken" in summary.markdown() and "failed" in summary.markdown()


def test_a_checkpoint_still_uploading_is_incomplete_not_failed_and_converted_once_complete(
    tiny_llama: Path, tmp_path: Path
) -> None:
    # Two of three shards landed, the index not yet: converting it would publish a model without
    # the layers of shard 3 as a version (and move LATEST to it).
    source, dest = tmp_path / "incoming", tmp_path / "bucket"
    landing = source / "llama"
    shutil.copytree(tiny_llama, landing, ignore=shutil.ignore_patterns("*00003-of-*", "*.index.json"))
    summary = run_sync(str(source), str(dest), ["W8A16"])
    _only(summary, "incomplete")
    assert summary.outcomes[0].reason == (
        f"file://{landing}: 1 of 3 shards are missing (model-00003-of-00003.safetensors), and there is no "
        "model.safetensors.index.json: the checkpoint is incomplete (still uploading, or copied in part); a "
        "later run converts it once every shard is there"), summary.text()
    assert summary.headline().endswith("0 converted, 0 skipped, 0 failed, 1 incomplete")
    assert not dest.exists() or not any(dest.iterdir())  # nothing written
    # The last shard being copied in (cp writes in place): its header says more than is there.
    shutil.copy(tiny_llama / "model.safetensors.index.json", landing)
    last = "model-00003-of-00003.safetensors"
    whole = (tiny_llama / last).read_bytes()
    (landing / last).write_bytes(whole[: len(whole) // 2])
    summary = run_sync(str(source), str(dest), ["W8A16"])
    _only(summary, "incomplete")
    assert summary.outcomes[0].reason.startswith(f"file://{landing}/{last}: tensor "), summary.text()
    assert summary.outcomes[0].reason.endswith(
        f"past the end of the file ({len(whole) // 2} bytes); the file is incomplete (still being copied, "
        "or cut short); a later run converts it once the file is whole"), summary.text()
    assert not dest.exists() or not any(dest.iterdir())
    (landing / last).write_bytes(whole)
    _only(run_sync(str(source), str(dest), ["W8A16"]), "converted")
    assert read_latest(open_storage(str(dest)), "llama", "W8A16") is not None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_fixed_generation_config_is_a_new_version_and_an_edited_model_card_is_not(
    tiny_llama: Path, tmp_path: Path, request: pytest.FixtureRequest, where: str
) -> None:
    # Fixes to the files a model loads with land days after a release (an end-of-turn token in
    # generation_config.json, a chat template in tokenizer_config.json): the published copy kept
    # the old one, as the version hashed the weights alone. A model card edit changes nothing.
    if where == "s3":
        s3: MotoS3 = request.getfixturevalue("s3")
        source, dest = f"s3://{s3.create_bucket()}/", f"s3://{s3.create_bucket()}/"
    else:
        source, dest = str(tmp_path / "incoming"), str(tmp_path / "bucket")
    model, out = open_storage(f"{source.rstrip('/')}/llama"), open_storage(dest)
    upload_dir(tiny_llama, model)
    model.put_bytes("README.md", b"# llama\n")
    first = run_sync(source, dest, ["W8A16"], shard_size=SHARDS)
    _only(first, "converted")
    model.put_bytes("README.md", b"# llama, with a longer card\n")
    _only(run_sync(source, dest, ["W8A16"], shard_size=SHARDS), "skipped")

    generation = json.loads(model.read_bytes("generation_config.json"))
    generation["eos_token_id"] = [2, 7]
    model.put_bytes("generation_config.json", json.dumps(generation).encode())
    fixed = run_sync(source, dest, ["W8A16"], shard_size=SHARDS)
    _only(fixed, "converted")
    old, new = (f"llama/W8A16/{run.outcomes[0].version}" for run in (first, fixed))
    assert new != old
    assert json.loads(out.read_bytes(f"{new}/generation_config.json"))["eos_token_id"] == [2, 7]
    latest = read_latest(out, "llama", "W8A16")
    assert latest is not None and latest.version == fixed.outcomes[0].version
    # The weights did not change: their shards were staged from the first version, not converted.
    assert fixed.outcomes[0].reason.startswith(
        f"3 shard(s) published (3 of them copied from version {first.outcomes[0].version}: "
    ), fixed.text()
    shards = sorted(i.key.rsplit("/", 1)[1] for i in out.list(f"{old}/") if i.key.endswith(".safetensors"))
    same = [*shards, "model.safetensors.index.json", "config.json"]
    assert len(same) > 3 and all(out.read_bytes(f"{old}/{n}") == out.read_bytes(f"{new}/{n}") for n in same)
    manifests = [json.loads(out.read_bytes(f"{v}/quantfleet.json")) for v in (old, new)]
    for key in ("tensors", "shards", "units", "totals"):
        assert manifests[1][key] == manifests[0][key], key
    assert all(r.ok for r in verify_uri(out.uri(new)))


def test_a_shard_gone_from_the_version_to_copy_from_is_converted(tiny_llama: Path, tmp_path: Path) -> None:
    # Someone deleted a shard of the published version: the new version copies the others and
    # converts that one (to the same bytes), rather than failing.
    source, dest = tmp_path / "incoming", tmp_path / "bucket"
    shutil.copytree(tiny_llama, source / "llama")
    first = run_sync(str(source), str(dest), ["W8A16"], shard_size=SHARDS)
    old = dest / "llama" / "W8A16" / str(first.outcomes[0].version)
    gone = sorted(old.glob("*.safetensors"))[1]
    kept = gone.read_bytes()
    gone.unlink()
    (source / "llama" / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    fixed = run_sync(str(source), str(dest), ["W8A16"], shard_size=SHARDS)
    _only(fixed, "converted")
    reason = fixed.outcomes[0].reason
    assert reason.startswith("3 shard(s) published (2 of them copied from version "), reason
    new = dest / "llama" / "W8A16" / str(fixed.outcomes[0].version)
    assert (new / gone.name).read_bytes() == kept
    assert all(r.ok for r in verify_uri(str(new)))


def test_overlapping_runs_publish_a_version_once(
    s3: MotoS3, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    incoming, bucket = s3.create_bucket(), s3.create_bucket()
    s3.client().put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    source, dest = f"s3://{incoming}/", f"s3://{bucket}/"
    upload_dir(tiny_llama, open_storage(f"{source}llama"))

    # Both runs have converted and staged, having seen "not published", before either commits:
    # the overlap the conditional marker must settle.
    barrier = threading.Barrier(2, timeout=120)
    real = sync_module.model_card

    def gated(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        barrier.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(sync_module, "model_card", gated)
    summaries: list[SyncSummary] = []
    threads = [threading.Thread(target=lambda: summaries.append(run_sync(source, dest, ["W4A16"])))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(summaries) == 2
    statuses = sorted(s.outcomes[0].status for s in summaries)
    assert statuses == ["converted", "skipped"], [s.text() for s in summaries]
    version = summaries[0].outcomes[0].version
    assert version == summaries[1].outcomes[0].version
    marker = f"llama/W4A16/{version}/{DEFAULT_MARKER}"
    written = s3.client().list_object_versions(Bucket=bucket, Prefix=marker).get("Versions", [])
    assert len(written) == 1, "the marker was written once"
    assert _versions(dest, "llama", "W4A16") == [version]
    assert all(r.ok for r in verify_uri(f"{dest}llama/W4A16"))


def test_the_sync_command_starts_ray_on_its_main_thread_and_only_when_there_is_work(
    tiny_llama: Path, tmp_path: Path
) -> None:
    # The pairs run in worker threads; Ray started from one warned that it could not set its
    # SIGTERM handler and took ~13 s to stop at exit. A sync that finds everything published
    # starts no Ray: RAY_TMPDIR (short, for Ray's socket paths) shows whether a session began.
    from tests.flows.test_cli import run_cli

    source, dest = tmp_path / "incoming", tmp_path / "bucket"
    shutil.copytree(tiny_llama, source / "llama")
    ray_dirs = [Path(tempfile.mkdtemp(prefix="qf-ray-", dir="/tmp")) for _ in range(2)]
    try:
        runs = []
        for ray_dir in ray_dirs:
            env = {"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "prefect"),
                   "RAY_TMPDIR": str(ray_dir), "RAY_ADDRESS": ""}
            runs.append(run_cli("sync", str(source), str(dest), "--recipe", "W8A16", env=env))
        first, second = runs
        assert first.returncode == 0 and "1 converted" in first.stdout, first.stdout + first.stderr
        assert "SIGTERM handler is not set" not in first.stderr, first.stderr
        assert list(ray_dirs[0].rglob("session_*")), "the first sync converted on a Ray it started"
        assert second.returncode == 0 and "1 skipped" in second.stdout, second.stdout + second.stderr
        assert not list(ray_dirs[1].rglob("session_*")), "nothing to convert: no Ray started"
    finally:
        for ray_dir in ray_dirs:
            shutil.rmtree(ray_dir, ignore_errors=True)
