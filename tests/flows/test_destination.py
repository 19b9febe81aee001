"""Destination safety: a destination that overlaps the source or holds files quantfleet did not
write is refused before any work, in one line, in every command and mode, leaving the source's
bytes as they were and nothing staged; quantfleet's own output and staging are not refused.

Refusals come before Ray or Prefect start, so these tests need neither (except the resume one).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import flows.cli as cli
from flows.cli import main
from flows.destination import DestinationRefused, check_destination, foreign_files, overlap
from flows.recipe import Recipe
from infra.publish import Publisher
from infra.storage import Storage, open_storage, parse_uri
from tests.flows.conftest import mounted_tmpfs, upload_dir
from tests.s3_server import MotoS3

PLAN_ID = "0123456789abcdef"  # staging areas are named by plan ids: 16 hex digits


# --- fixtures and helpers -----------------------------------------------------------------


def digests(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, minilm: str) -> Iterator[Path]:
    """A drop folder for sync holding a copy of MiniLM (`tree/minilm`): the source we may compare.

    Every test checks it is untouched (`local_state`); here, at the end, every byte is re-hashed.
    """
    root = tmp_path_factory.mktemp("tree")
    shutil.copytree(minilm, root / "minilm")
    before = digests(root)
    yield root
    assert digests(root) == before


@pytest.fixture(scope="module")
def checkpoint(tree: Path) -> Path:
    return tree / "minilm"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A folder of the user's own files."""
    folder = tmp_path / "home"
    for rel in ("notes.txt", "photos/a.jpg", "photos/b.jpg", "config.json", "thesis/draft.md"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(f"the user's {rel}\n")
    return folder


def snapshot(storage: Storage) -> dict[str, tuple[int, str | None]]:
    """Size and ETag (which changes with the bytes) of every object in a bucket."""
    return {i.key: (i.size, i.etag) for i in storage.list("")}


def local_state(path: Path) -> dict[str, str] | None:
    """Every file and folder (empty ones too) under `path`, None when absent. A file is its
    SHA-256 when small, else its size, inode and mtime, which any write or replacement changes
    (the `tree` fixture re-hashes the big ones once, at the end)."""
    if not path.exists():
        return None
    state = {}
    for item in sorted(path.rglob("*")):
        rel = item.relative_to(path).as_posix()
        if not item.is_file():
            state[rel] = "folder"
            continue
        st = item.stat()
        small = st.st_size < 1 << 20
        state[rel] = hashlib.sha256(item.read_bytes()).hexdigest() if small else \
            f"{st.st_size}:{st.st_ino}:{st.st_mtime_ns}"
    return state


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    """Run the CLI; it must exit 2 with one `quantfleet: error:` line holding `expected`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantfleet: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


def untouched(paths: list[Path], run: Callable[[], object]) -> None:
    """`run` must leave every path (the source, the destination) exactly as it was."""
    before = [local_state(p) for p in paths]
    run()
    assert [local_state(p) for p in paths] == before


def assert_ok(code: int) -> None:
    assert code == 0


MODES = [pytest.param([], id="prefect"), pytest.param(["--no-prefect"], id="no-prefect")]


# --- how paths and URIs overlap -----------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "dest", "relation"),
    [
        ("s3://b/models/llama", "s3://b/models/llama/", "same"),
        ("s3://b/models/llama", "s3://b/models", "contains"),
        ("s3://b/models/llama", "s3://b", "contains"),
        ("s3://b/models/llama", "s3://b/models/llama/w4", "inside"),
        ("s3://b/models/llama", "s3://b/models/llama-w4", None),  # a sibling prefix, not a subfolder
        ("s3://b/models/llama", "s3://other/models/llama", None),
        ("/data/models/llama", "/data/models/llama/sub/..", "same"),
        ("/data/models/llama", "file:///data/models", "contains"),
        ("/data/models/llama", "/data/models/llama/out", "inside"),
        ("/data/models/llama", "/data/models/llama2", None),
        ("/data/models/llama", "s3://data/models/llama", None),
    ],
)
def test_overlap_compares_path_segments(source: str, dest: str, relation: str | None) -> None:
    found = overlap(parse_uri(source), parse_uri(dest))
    assert (found[0] if found else None) == relation


def test_overlap_sees_through_symlinks(checkpoint: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(checkpoint)
    assert overlap(parse_uri(str(checkpoint)), parse_uri(str(alias))) == ("same", ())
    assert overlap(parse_uri(str(alias)), parse_uri(str(alias / "out"))) == ("inside", ("out",))


def test_a_hidden_folder_inside_the_source_is_allowed(checkpoint: Path, tree: Path) -> None:
    # Hidden folders are never read: not as weights, side files, nor sync checkpoints.
    check_destination(str(checkpoint), str(checkpoint / ".quantized"))
    check_destination(str(tree), str(tree / ".out"), source_kind="tree")
    assert not (checkpoint / ".quantized").exists() and not (tree / ".out").exists()


# --- convert, in both modes ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("dest", "expected"),
    [
        ("{checkpoint}", "the destination is the source checkpoint"),
        ("{checkpoint}/sub/..", "the destination is the source checkpoint"),
        ("{checkpoint}/quantized", "the destination lies inside the source"),
        ("{tree}", "the destination contains the source"),
    ],
)
def test_convert_refuses_a_destination_overlapping_the_source(
    capsys, checkpoint: Path, tree: Path, mode: list[str], dest: str, expected: str
) -> None:
    target = dest.format(checkpoint=checkpoint, tree=tree)
    argv = ["convert", str(checkpoint), target, "--scheme", "W8A16", *mode]
    untouched([tree], lambda: refused(capsys, argv, expected, "choose"))


@pytest.mark.parametrize("mode", MODES)
def test_convert_refuses_a_destination_holding_other_files(
    capsys, checkpoint: Path, tree: Path, home: Path, mode: list[str]
) -> None:
    argv = ["convert", str(checkpoint), str(home), "--scheme", "W8A16", *mode]
    err = ""

    def run() -> None:
        nonlocal err
        err = refused(capsys, argv, "holds 5 file(s) quantfleet did not write",
                      "config.json, notes.txt, photos/a.jpg and 2 more", "choose another destination")

    untouched([tree, home], run)
    assert "delete" not in err


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs mounted at a fresh folder (unmounted after the test): writes there fail
    with EROFS, for root too (as CI runs), where permission bits would not stop it."""
    with mounted_tmpfs(tmp_path / "read-only", "ro,size=256m", "a read-only filesystem needs one") as mount:
        yield mount


@pytest.mark.parametrize("mode", MODES)
def test_a_destination_that_cannot_be_written_is_refused_before_any_work(
    capsys, checkpoint: Path, tmp_path: Path, read_only_folder: Path, mode: list[str]
) -> None:
    # Every unit failed at its first write, after Ray's start-up, each with the same bare
    # "[Errno 30] Read-only file system" line (thousands of lines on a large model).
    refused(capsys, ["convert", str(checkpoint), str(read_only_folder / "out"), "--scheme", "W8A16", *mode],
            f"file://{read_only_folder}/out: cannot publish there: {read_only_folder} is on a read-only "
            "filesystem; choose another destination")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    refused(capsys, ["convert", str(checkpoint), str(a_file / "out"), "--scheme", "W8A16", *mode],
            f"cannot publish there: {a_file} is a file, not a folder")
    assert a_file.read_text() == "mine"


def test_a_destination_that_turns_read_only_mid_run_stops_it_and_the_rerun_resumes(
    local_ray: None, checkpoint: Path, tmp_path: Path
) -> None:
    # Past the up-front check (ext4 remounts itself read-only on I/O errors): every unit still
    # queued failed the same way, each with a bare "[Errno 30] Read-only file system" line.
    from flows.execute import ConversionFailed
    from flows.pipeline import convert_units, finalize_and_publish, plan_conversion

    plan = plan_conversion(str(checkpoint), Recipe.preset("W8A16"), shard_size=20_000_000)
    assert len(plan.units) >= 3
    with mounted_tmpfs(tmp_path / "disk", "size=256m", "a filesystem to remount read-only needs one") as disk:
        dest = str(disk / "out")

        def read_only_after_the_first(unit, result) -> None:  # noqa: ANN001
            if unit.index == 0:
                subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)

        # One unit in flight at a time, so the next one is sent after the remount.
        with pytest.raises(ConversionFailed) as failed:
            convert_units(plan, dest, device="cpu", max_in_flight=1, on_done=read_only_after_the_first)
        assert str(failed.value).splitlines() == [
            "1 unit(s) failed:",
            f"  - unit 1 ({plan.units[1].file_name}): Read-only file system writing in "
            f"{disk}/out/.staging/{plan.staging_id}",
            f"  - {len(plan.units) - 2} more unit(s) not started: the destination cannot be written. The "
            "units finished before stay staged: make it writable and run the same command again to resume",
        ]
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        results = convert_units(plan, dest, device="cpu")
        assert [r.reused for r in results] == [True] + [False] * (len(plan.units) - 1)
        finalize_and_publish(plan, dest, results, device="cpu")
        assert (disk / "out" / "_QUANTFLEET_PUBLISHED.json").exists()


def test_an_s3_session_token_that_expires_mid_run_fails_the_unit_in_a_way_that_stops_the_run(
    checkpoint: Path, s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A session token (STS, SSO) runs out hours into a large conversion: S3 answers 400
    # ExpiredToken to every request. The unit says so in a way that stops the run (FailsEveryUnit).
    from flows.pipeline import plan_conversion, unit_context
    from tests.infra.fault_proxy import FaultProxy
    from workers.convert_unit import convert_unit
    from workers.errors import CredentialsRefused

    plan = plan_conversion(str(checkpoint), Recipe.preset("W8A16"), shard_size=20_000_000)
    dest = f"s3://{s3.create_bucket()}/out"
    with FaultProxy(s3.host, s3.port) as proxy:
        monkeypatch.setenv("QUANTFLEET_S3_ENDPOINT_URL", proxy.endpoint_url)
        context = unit_context(plan, open_storage(dest), "cpu")
        proxy.add("expired", method="PUT|POST", times=1000)
        unit = plan.units[0]
        with pytest.raises(CredentialsRefused) as failed:
            convert_unit(unit, context)
    assert str(failed.value).startswith(
        f"unit 0 ({unit.file_name}): {context.staging_uri}/{unit.file_name}: access denied ("), failed.value
    assert str(failed.value).endswith("ExpiredToken: The provided token has expired.")


def test_the_issue_example_is_refused_before_any_work(capsys, checkpoint: Path, tree: Path) -> None:
    # `quantfleet convert ./src ./src --scheme W8A16 --no-prefect` used to convert everything and
    # then advise deleting the source's config.json.
    argv = ["convert", str(checkpoint), str(checkpoint), "--scheme", "W8A16", "--no-prefect"]
    untouched([tree], lambda: refused(capsys, argv, "the destination is the source checkpoint"))
    assert "delete" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def s3_source(s3: MotoS3, tiny_llama: Path) -> tuple[str, str]:
    """(bucket, the S3 URI of a tiny real Llama checkpoint dropped in its `incoming/`)."""
    bucket = s3.create_bucket()
    upload_dir(tiny_llama, open_storage(f"s3://{bucket}/incoming/llama"))
    return bucket, f"s3://{bucket}/incoming/llama"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("dest", "expected"),
    [
        ("s3://{bucket}/incoming/llama/", "the destination is the source checkpoint"),
        ("s3://{bucket}/incoming/llama/w4a16", "the destination lies inside the source"),
        ("s3://{bucket}/incoming", "the destination contains the source"),
        ("s3://{bucket}/data", "holds 2 file(s) quantfleet did not write (logs/a.txt, logs/b.txt)"),
    ],
)
def test_convert_refuses_unsafe_s3_destinations(
    capsys, s3_source: tuple[str, str], mode: list[str], dest: str, expected: str
) -> None:
    bucket, source = s3_source
    everything = open_storage(f"s3://{bucket}")
    for key in ("data/logs/a.txt", "data/logs/b.txt"):
        everything.put_bytes(key, b"someone else's data\n")
    before = snapshot(everything)
    refused(capsys, ["convert", source, dest.format(bucket=bucket), "--scheme", "W4A16", *mode], expected)
    assert snapshot(everything) == before  # the source unchanged, nothing staged anywhere


def test_s3_destinations_apart_from_the_source_pass(s3_source: tuple[str, str], s3: MotoS3) -> None:
    bucket, source = s3_source
    check_destination(source, f"s3://{bucket}/incoming/llama-w4a16")  # a sibling prefix
    check_destination(source, f"s3://{s3.create_bucket()}/incoming/llama")  # another bucket


# --- sync, in both modes ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("dest", "expected"),
    [
        ("{tree}", "the destination is the source folder"),
        ("{tree}/minilm/out", "every folder of which is scanned for checkpoints"),
        ("{tree}/published", "every folder of which is scanned for checkpoints"),
        ("{tree}/..", "the destination contains the source"),
    ],
)
def test_sync_refuses_a_destination_overlapping_the_source(
    capsys, tree: Path, mode: list[str], dest: str, expected: str
) -> None:
    argv = ["sync", str(tree), dest.format(tree=tree), "--recipe", "W4A16", *mode]
    untouched([tree], lambda: refused(capsys, argv, expected))


@pytest.mark.parametrize("mode", MODES)
def test_sync_refuses_a_destination_holding_other_files(
    capsys, tree: Path, home: Path, mode: list[str]
) -> None:
    argv = ["sync", str(tree), str(home), "--recipe", "W4A16", *mode]
    untouched([tree, home], lambda: refused(capsys, argv, "holds 5 file(s) quantfleet did not write"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("dest", "expected"),
    [
        ("s3://{bucket}/incoming/", "the destination is the source folder"),
        ("s3://{bucket}/", "the destination contains the source"),
        ("s3://{bucket}/incoming/llama/out", "every folder of which is scanned for checkpoints"),
        ("s3://{bucket}/data/", "holds 2 file(s) quantfleet did not write"),
    ],
)
def test_sync_refuses_unsafe_s3_destinations(
    capsys, s3_source: tuple[str, str], mode: list[str], dest: str, expected: str
) -> None:
    bucket, _ = s3_source
    everything = open_storage(f"s3://{bucket}")
    for key in ("data/logs/a.txt", "data/logs/b.txt"):
        everything.put_bytes(key, b"someone else's data\n")
    before = snapshot(everything)
    argv = ["sync", f"s3://{bucket}/incoming/", dest.format(bucket=bucket), "--recipe", "W4A16", *mode]
    refused(capsys, argv, expected)
    assert snapshot(everything) == before


def test_schedule_refuses_before_registering(capsys, tree: Path) -> None:
    argv = ["schedule", "--interval", "60", "--source", str(tree), "--dest", str(tree), "--recipe", "W4A16"]
    untouched([tree], lambda: refused(capsys, argv, "the destination is the source folder"))


# --- demo and sweep -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dest", "expected"),
    [
        ("{checkpoint}", "the destination is the source checkpoint"),
        ("{checkpoint}/demo", "the destination lies inside the source"),
        ("{home}", "holds 5 file(s) quantfleet did not write"),
    ],
)
def test_demo_refuses_unsafe_destinations(
    capsys, monkeypatch, checkpoint: Path, tree: Path, home: Path, dest: str, expected: str
) -> None:
    # The demo's model is the bundled one; a copy stands in for it so that a failing check could
    # never write into the installed package.
    monkeypatch.setattr(cli, "bundled_model_path", lambda: str(checkpoint))
    argv = ["demo", dest.format(checkpoint=checkpoint, home=home)]
    untouched([tree, home], lambda: refused(capsys, argv, expected))


@pytest.mark.parametrize(
    ("out", "expected"),
    [
        ("{checkpoint}", "the destination is the source checkpoint"),
        ("{checkpoint}/sweep", "the destination lies inside the source"),
        ("{tree}", "the destination contains the source"),
        ("{home}", "holds 5 file(s) quantfleet did not write"),
    ],
)
def test_sweep_refuses_unsafe_output_folders(
    capsys, checkpoint: Path, tree: Path, home: Path, out: str, expected: str
) -> None:
    argv = ["sweep", str(checkpoint), "--schemes", "W8A16", "--out",
            out.format(checkpoint=checkpoint, tree=tree, home=home)]
    untouched([tree, home], lambda: refused(capsys, argv, expected))


# --- the flows check too, for callers that skip the CLI (scheduled runs, Python) -------------


def test_the_flows_refuse_on_their_own(checkpoint: Path, tree: Path, home: Path) -> None:
    from flows.convert import convert_flow
    from flows.pipeline import run_conversion
    from flows.sweep import run_sweep
    from flows.sync import run_sync, sync_flow

    recipe = Recipe.preset("W4A16")
    calls: list[Callable[[], object]] = [
        lambda: convert_flow.fn(str(checkpoint), str(checkpoint), recipe),  # the flow's body
        lambda: run_conversion(str(checkpoint), str(home), recipe),
        lambda: run_sweep(str(checkpoint), ["W4A16"], checkpoint / "sweep"),
        lambda: sync_flow.fn(str(tree), str(tree / "out"), ["W4A16"]),
        lambda: run_sync(str(tree), str(home), ["W4A16"]),
    ]
    before = [local_state(tree), local_state(home)]
    for call in calls:
        with pytest.raises(DestinationRefused):
            call()
    assert [local_state(tree), local_state(home)] == before


# --- what quantfleet wrote is not refused ---------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(tmp_path / "dest")
    server: MotoS3 = request.getfixturevalue("s3")
    return open_storage(f"s3://{server.create_bucket()}/models")


def _stage(storage: Storage, prefix: str, run_id: str = PLAN_ID) -> Publisher:
    publisher = Publisher(storage, prefix, run_id)
    publisher.stage_bytes("model.safetensors", b"\x08" + bytes(200))
    publisher.stage_bytes("config.json", b'{"model_type": "llama"}\n')
    publisher.stage_bytes("1_Pooling/config.json", b'{"pooling_mode_mean_tokens": true}\n')
    return publisher


def test_staging_of_an_interrupted_run_is_ours(dest: Storage) -> None:
    _stage(dest, "")
    assert foreign_files(dest) == []
    check_destination("/elsewhere/model", dest.uri())


def test_files_an_interrupted_commit_copied_out_are_ours(dest: Storage) -> None:
    publisher = _stage(dest, "")
    for key in ("config.json", "1_Pooling/config.json"):  # commit copies, then died before the marker
        dest.copy(publisher.stage_key(key), key)
    assert foreign_files(dest) == []
    dest.put_bytes("config.json", b'{"model_type": "the user\'s"}\n')  # not the staged bytes' size
    assert foreign_files(dest) == ["config.json"]


def test_published_versions_and_their_staging_are_ours(dest: Storage) -> None:
    _stage(dest, "").commit()
    _stage(dest, "", run_id="fedcba9876543210")  # a later run's leftover staging beside it
    assert foreign_files(dest) == []
    dest.put_bytes("notes.txt", b"mine")
    dest.put_bytes(".staging/backup/old.bin", b"not a staging area of ours: not a plan id")
    assert foreign_files(dest) == [".staging/backup/old.bin", "notes.txt"]


def test_a_sync_destination_with_latest_is_ours(dest: Storage) -> None:
    from flows.finalize import MANIFEST_NAME
    from flows.versions import move_latest, version_prefix

    for version in ("1111111111111111", "2222222222222222"):
        publisher = _stage(dest, version_prefix("team/llama", "W4A16", version))
        publisher.stage_bytes(MANIFEST_NAME, b'{"plan_id": "%s"}\n' % version.encode())
        publisher.commit()
        assert move_latest(dest, "team/llama", "W4A16", version, source_uri="s3://in/team/llama",
                           source_identity="abc", observed_at=f"2026-12-01T00:00:0{version[0]}")
    _stage(dest, version_prefix("team/llama", "FP8", "3333333333333333"))  # an interrupted pair
    assert foreign_files(dest) == []
    dest.put_bytes("team/qwen/W4A16/LATEST", b"not a pointer of ours")
    assert foreign_files(dest) == ["team/qwen/W4A16/LATEST"]


def test_a_sweep_folder_is_ours(dest: Storage) -> None:
    from flows.sweep import SWEEP_FILES, SweepPoint, SweepResult
    from workers.evaluation import Evaluation

    evaluation = Evaluation(kind="encoder", original="a", quantized="b", text="t", text_sha256="0" * 64,
                            tokens=8, windows=1, context=8, device="cpu", dtype="float32", seconds=1.0,
                            tokens_per_s=8.0, scored_tokens=8, embedding_cosine=0.99)
    point = SweepPoint(scheme="W8A16", dest_uri=dest.uri("W8A16"), bits_per_weight=8.2,
                       bits_per_weight_all=8.2, bytes_out=201, probe_error_rms=0.01, probe_error_max=0.02,
                       evaluation=evaluation)
    result = SweepResult(model="m", kind="encoder", text="t", tokens=8, points=(point,), log_correlation=None,
                         rank_correlation=None, fit_exponent=None, fit_factor=None)
    _stage(dest, "W8A16").commit()
    for name in SWEEP_FILES:
        dest.put_bytes(name, result.model_dump_json().encode() if name == "sweep.json" else b"chart")
    assert foreign_files(dest) == []
    dest.put_bytes("sweep.json", b'{"not": "a sweep"}')
    assert foreign_files(dest) == sorted(SWEEP_FILES)


@pytest.mark.usefixtures("local_ray")
def test_an_interrupted_conversion_resumes_and_leaves_no_staging(capsys, checkpoint: Path, tmp_path: Path):
    from flows.pipeline import convert_units, plan_conversion

    dest = tmp_path / "out"
    plan = plan_conversion(str(checkpoint), Recipe.preset("W8A16"), shard_size=50_000_000)
    convert_units(plan, str(dest))  # every unit staged; the driver "dies" before finalize
    assert list((dest / ".staging").iterdir()) == [dest / ".staging" / plan.staging_id]
    assert foreign_files(open_storage(dest)) == []
    argv = ["convert", str(checkpoint), str(dest), "--scheme", "W8A16", "--shard-size", "50MB",
            "--no-prefect"]
    untouched([checkpoint], lambda: assert_ok(main(argv)))
    units = len(plan.units)
    assert f"{units} units, {units} reused from an earlier run" in capsys.readouterr().out
    assert (dest / "_QUANTFLEET_PUBLISHED.json").exists()
    assert not (dest / ".staging").exists()  # no empty staging folder left behind
    # The same command in the default Prefect mode: published already, so nothing to do.
    published = digests(dest)
    assert main(argv[:-1]) == 0
    assert "already holds this conversion (plan " in capsys.readouterr().out
    assert digests(dest) == published
    refused(capsys, ["convert", str(checkpoint), str(dest), "--scheme", "W8A16"],
            "already holds this recipe's conversion of an earlier state of the source, or with another "
            "shard size")
    refused(capsys, ["convert", str(checkpoint), str(dest), "--scheme", "FP8"],
            f"already holds a published conversion (plan {plan.plan_id}: W8A16 of file://{checkpoint})")


@pytest.mark.usefixtures("local_ray")
def test_a_run_beaten_to_the_commit_by_the_same_command_finds_its_own_conversion(
    checkpoint: Path, tmp_path: Path
) -> None:
    # Two overlapping runs of one command: the second to publish finds the first's commit (the CLI
    # then ends with nothing more to do, as the later of two `quantfleet convert`s did by hand).
    from flows.pipeline import convert_units, finalize_and_publish, plan_conversion, run_conversion
    from flows.published import published_as_planned
    from infra.errors import AlreadyExists

    dest = str(tmp_path / "out")
    plan = plan_conversion(str(checkpoint), Recipe.preset("W8A16"), shard_size=50_000_000)
    results = convert_units(plan, dest)
    assert published_as_planned(dest, plan) is None  # nothing published yet
    run_conversion(str(checkpoint), dest, Recipe.preset("W8A16"), shard_size=50_000_000)  # the other run
    with pytest.raises(AlreadyExists):
        finalize_and_publish(plan, dest, results)
    found = published_as_planned(dest, plan)
    assert found is not None and found.plan_id == plan.plan_id
    other = plan_conversion(str(checkpoint), Recipe.preset("FP8"), shard_size=50_000_000)
    assert published_as_planned(dest, other) is None
    # Another conversion's run, at any of its steps, is told what holds the destination.
    with pytest.raises(AlreadyExists, match=r"already holds a published conversion \(plan [0-9a-f]{16}: "
                                            r"W8A16 of file://"):
        convert_units(other, dest)
