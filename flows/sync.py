"""The Prefect flow `sync`: convert every checkpoint under a source that is not published yet.

For each checkpoint found under the source (a folder with config.json and safetensors) and each
recipe, the plan (headers only) gives the version: its plan id, which hashes the source identity
(ETags on S3, size/inode/mtime locally) and those of the side files the model loads with (config,
tokenizer, chat template; not a model card), the recipe, the tool version and the shard size. If
`<dest>/<model>/<recipe>/<version>/` is published the pair is skipped; otherwise it is converted
there with the same steps as `convert` (flows/pipeline.py), with a model card README.md staged
beside the report, and LATEST is moved once the version is committed (flows/versions.py). A new
version whose weights did not change (only such a side file did) takes its shards from LATEST's
version instead of converting them (flows/reuse.py).

Pairs run one after another, or up to `max_parallel` at once; one failing pair never stops the
others, and the summary (returned, and a Prefect artifact) lists what was converted, skipped and
failed, and why. A checkpoint whose shards are not all there yet (an upload in progress: the
index names a missing file, or `-00003-of-00005` has no sibling 5; a shard shorter than its header
says, still being copied in) is incomplete, not failed: the run succeeds and a later one converts it.
Two overlapping runs that convert the same version publish it once: the second commit finds the
marker (conditional write) and reports the pair as skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict

from flows.charts import per_layer_series
from flows.destination import check_destination
from flows.execute import ClusterInfo, start_ray
from flows.finalize import CHART_NAME, report_markdown
from flows.gates import gate_results
from flows.gguf_output.companion import GGUF_FOLDER
from flows.pipeline import (
    convert_units,
    evaluate_staged,
    evaluate_staged_gguf,
    gate_and_publish,
    plan_conversion,
    stage_for_publish,
)
from flows.plan import Plan
from flows.recipe import Recipe
from flows.reuse import stage_published_shards
from flows.versions import (
    Checkpoint,
    find_checkpoints,
    move_latest,
    read_latest,
    utc_now,
    version_prefix,
)
from infra.errors import MissingShardError, TruncatedFileError
from infra.publish import Expected, is_published
from infra.storage import open_storage
from workers.evaluation import Evaluation
from workers.records import UnitResult

__all__ = [
    "CARD_NAME",
    "SyncFailed",
    "SyncOutcome",
    "SyncSummary",
    "load_recipe",
    "model_card",
    "run_sync",
    "sync_flow",
    "sync_one",
]

CARD_NAME = "README.md"
_log = logging.getLogger(__name__)
# What a checkpoint still landing raises when planned: a shard not there yet, or one still being
# copied in. The pair is incomplete, not failed.
STILL_LANDING = (MissingShardError, TruncatedFileError)
_ray_lock = threading.Lock()
# matplotlib is not thread-safe (concurrent renders fail inside its text layout), and the report
# step renders the per-layer chart: pairs running in threads stage reports and commit one at a
# time. Commits are copies and small writes, so this costs little next to the conversions.
_report_lock = threading.Lock()


class SyncOutcome(BaseModel):
    """What happened to one (checkpoint, recipe) pair in a sync run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    recipe: str
    source_uri: str
    status: Literal["converted", "skipped", "incomplete", "failed"]
    reason: str
    version: str | None = None
    dest_uri: str | None = None
    latest_moved: bool = False
    seconds: float = 0.0


class SyncSummary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    source_uri: str
    dest_uri: str
    outcomes: tuple[SyncOutcome, ...]

    def of(self, status: str) -> list[SyncOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def converted(self) -> list[SyncOutcome]:
        return self.of("converted")

    @property
    def skipped(self) -> list[SyncOutcome]:
        return self.of("skipped")

    @property
    def failed(self) -> list[SyncOutcome]:
        return self.of("failed")

    @property
    def incomplete(self) -> list[SyncOutcome]:
        return self.of("incomplete")

    def headline(self) -> str:
        waiting = f", {len(self.incomplete)} incomplete" if self.incomplete else ""
        return (f"sync {self.source_uri} -> {self.dest_uri}: {len(self.converted)} converted, "
                f"{len(self.skipped)} skipped, {len(self.failed)} failed{waiting}")

    def markdown(self) -> str:
        lines = [f"# {self.headline()}", "", "| model | recipe | status | version | why |",
                 "|---|---|---|---|---|"]
        for o in self.outcomes:
            why = o.reason.replace("|", "\\|")
            lines.append(f"| `{o.model}` | {o.recipe} | {o.status} | {o.version or '-'} | {why} |")
        if not self.outcomes:
            lines.append("| (no checkpoints found) | | | | |")
        return "\n".join(lines) + "\n"

    def text(self) -> str:
        lines = [self.headline()]
        for o in self.outcomes:
            where = f" {o.dest_uri}" if o.dest_uri else ""
            lines.append(f"  {o.status:<9} {o.model} [{o.recipe}]{where}: {o.reason}")
        return "\n".join(lines)


class SyncFailed(Exception):
    """At least one pair failed; the others ran. Carries the run's summary."""

    def __init__(self, summary: SyncSummary) -> None:
        failed = "; ".join(f"{o.model} [{o.recipe}]: {o.reason}" for o in summary.failed)
        super().__init__(f"{summary.headline()}: {failed}")
        self.summary = summary


def load_recipe(spec: str) -> Recipe:
    """A recipe from a preset scheme name (W4A16, FP8, ...) or a YAML file path."""
    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        return Recipe.from_yaml(spec)
    return Recipe.preset(spec)


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def model_card(
    checkpoint: Checkpoint,
    plan: Plan,
    version_uri: str,
    results: Sequence[UnitResult],
    evaluation: Evaluation | None,
    gguf_results: Sequence[UnitResult] = (),
    gguf_evaluation: Evaluation | None = None,
) -> str:
    """README.md of a published version: what it is, how to load and check it, and the report."""
    tensors = [t for r in results for t in r.tensors]
    gates = gate_results(plan, tensors, evaluation, gguf_evaluation)
    chart = CHART_NAME if per_layer_series(tensors) else None  # staged by stage_report_files
    report = report_markdown(plan, results, evaluation, gates, chart, gguf_results, gguf_evaluation)
    body = report.split("\n", 1)[1] if report.startswith("# ") else report
    schemes: list[str] = sorted({s.format for s in plan.schemes})
    library, what = "transformers", [
        f"A compressed-tensors checkpoint of `{checkpoint.uri}` made by quantfleet {plan.tool_version}.",
        f"It loads in transformers (with `compressed-tensors` installed) and vLLM: copy `{version_uri}` "
        "and point `from_pretrained` or `vllm serve` at the folder."]
    if plan.recipe.format == "gguf":
        first = plan.units[0].file_name if plan.units else "model.gguf"
        library, schemes = "gguf", [plan.recipe.scheme.upper()]
        what = [f"A GGUF ({plan.recipe.scheme.upper()}) of `{checkpoint.uri}` made by quantfleet "
                f"{plan.tool_version}, in {len(plan.units)} split(s). It loads in llama.cpp, Ollama and "
                f"LM Studio: copy `{version_uri}` and open `{first}` (the other splits load with it)."]
    elif plan.gguf is not None:
        first = plan.gguf.units[0].file_name if plan.gguf.units else "model.gguf"
        schemes.append(f"GGUF {plan.gguf.recipe.scheme}")
        what += ["", f"The same conversion as a GGUF ({plan.gguf.recipe.scheme}) for llama.cpp, Ollama and "
                 f"LM Studio is in `{GGUF_FOLDER}/`: open `{GGUF_FOLDER}/{first}` (the other splits load "
                 "with it)."]
    tags = "\n".join(f"- {t}" for t in ["quantfleet", library if library == "gguf" else "compressed-tensors",
                                         *schemes])
    return "\n".join([
        "---",
        f"library_name: {library}",
        "tags:",
        tags,
        "---",
        "",
        f"# {checkpoint.name}: {plan.recipe.label} (version {plan.plan_id})",
        "",
        *what,
        "",
        f"- source identity (file keys, sizes, ETags): `{plan.source_identity}`",
        f"- plan id: `{plan.plan_id}`; provenance, per-tensor metrics and checksums: `quantfleet.json`",
        f"- check every byte of this copy: `quantfleet verify {version_uri}`",
        "",
        body.lstrip("\n"),
    ])


def _cluster(ray_address: str | None) -> ClusterInfo:
    with _ray_lock:  # pairs run in threads: start or join Ray once
        return start_ray(ray_address)


def _start_ray_if_work(
    work: Sequence[tuple[Checkpoint, Recipe]], dest_uri: str, shard_size: int, ray_address: str | None
) -> None:
    """Start (or join) Ray on the calling thread when some pair is not published yet.

    The pairs run in worker threads, and Ray started from one cannot install its SIGTERM handler
    (a warning on the console) and took ~13 s to shut down when the command exited, against ~1 s
    from the main thread. A sync that finds everything published starts no Ray at all. A pair
    that cannot even be planned counts as work (`sync_one` reports why it fails), and so does a
    mixed-precision recipe: its plan needs the measure pass, which runs on Ray. The plans made
    here are not handed on: `sync_one` plans again just before it converts (headers only), so a
    conversion never works from a plan older than its own start.
    """
    dest = open_storage(dest_uri)
    for checkpoint, recipe in work:
        if recipe.mixed:
            _cluster(ray_address)
            return
        try:
            plan = plan_conversion(checkpoint.uri, recipe, shard_size=shard_size)
            if is_published(dest, version_prefix(checkpoint.name, recipe.label, plan.plan_id)):
                continue
        except STILL_LANDING:
            continue  # still uploading: nothing to convert this time
        except Exception:  # noqa: BLE001 - sync_one plans again and reports the failure
            pass
        _cluster(ray_address)
        return


def sync_one(
    checkpoint: Checkpoint,
    recipe: Recipe,
    dest_uri: str,
    *,
    shard_size: int = 5_000_000_000,
    ray_address: str | None = None,
    device: str = "auto",
) -> SyncOutcome:
    """Convert and publish one checkpoint with one recipe unless that version is published.

    Raises on failure (the caller records it); a version another run published meanwhile is
    reported as skipped, a checkpoint with shards missing (still uploading) as incomplete.
    """
    started = time.perf_counter()
    observed_at = utc_now()
    try:
        plan = plan_conversion(checkpoint.uri, recipe, shard_size=shard_size)
    except STILL_LANDING as error:
        # Shards still to come or still being copied in (an upload in progress): not a failure of
        # the run, and nothing to convert yet; a later run converts the checkpoint once they are all
        # there in full.
        once = "every shard is there" if isinstance(error, MissingShardError) else "the file is whole"
        return SyncOutcome(model=checkpoint.name, recipe=recipe.label, source_uri=checkpoint.uri,
                           status="incomplete", seconds=time.perf_counter() - started,
                           reason=f"{_reason(error)}; a later run converts it once {once}")
    dest = open_storage(dest_uri)
    prefix = version_prefix(checkpoint.name, recipe.label, plan.plan_id)
    version_uri = dest.uri(prefix)

    def latest() -> bool:
        return move_latest(dest, checkpoint.name, recipe.label, plan.plan_id, source_uri=plan.source_uri,
                           source_identity=plan.source_identity, observed_at=observed_at)

    def outcome(status: Literal["converted", "skipped"], reason: str, moved: bool) -> SyncOutcome:
        if moved:
            reason += "; LATEST moved to it"
        return SyncOutcome(model=checkpoint.name, recipe=recipe.label, source_uri=checkpoint.uri,
                           status=status, reason=reason, version=plan.plan_id, dest_uri=version_uri,
                           latest_moved=moved, seconds=time.perf_counter() - started)

    if is_published(dest, prefix):
        return outcome("skipped", "already published (same source files, recipe and tool version)",
                       latest())
    # When only files the model loads with changed since LATEST's version (a fixed chat template),
    # its shards are this version's: staged from there, nothing is converted.
    # LATEST records its weights' identity: a version made from other weights (the usual new
    # version) is not read further (a 1T model's manifest is tens of MB).
    previous = read_latest(dest, checkpoint.name, recipe.label)
    copied = 0
    if previous is not None and previous.source_identity == plan.source_identity:
        copied = stage_published_shards(plan, dest, version_prefix(checkpoint.name, recipe.label,
                                                                   previous.version), prefix)
    try:
        cluster = _cluster(ray_address)
        results = convert_units(plan, version_uri, cluster=cluster, device=device)
        gguf_results = convert_units(plan, version_uri, cluster=cluster, device=device, gguf_half=True)
        records = stage_for_publish(plan, version_uri, results, gguf_results)
        evaluation = evaluate_staged(plan, version_uri, cluster=cluster, device=device)
        gguf_evaluation = evaluate_staged_gguf(plan, version_uri, cluster=cluster, device=device)
        card = model_card(checkpoint, plan, version_uri, results, evaluation, gguf_results, gguf_evaluation)
        staged = plan.publisher(open_storage(version_uri)).stage_bytes(CARD_NAME, card.encode())
        records = {**records, CARD_NAME: Expected.of(staged)}
        with _report_lock:
            gate_and_publish(plan, version_uri, results, records, evaluation, gguf_results, gguf_evaluation)
    except Exception as error:
        if is_published(dest, prefix):  # an overlapping run committed the same version first
            _log.info("%s: published by another run meanwhile (%s)", version_uri, _reason(error))
            return outcome("skipped", "published by an overlapping run while this one converted",
                           latest())
        raise
    how = ""
    if copied and previous is not None:
        how = (f" ({copied} of them copied from version {previous.version}: only files the model loads with "
               "changed)")
    return outcome("converted", f"{len(results)} shard(s) published{how}", latest())


def _failed(checkpoint: Checkpoint, recipe: Recipe, error: BaseException) -> SyncOutcome:
    return SyncOutcome(model=checkpoint.name, recipe=recipe.label, source_uri=checkpoint.uri,
                       status="failed", reason=f"{type(error).__name__}: {_reason(error)}")


def run_sync(
    source: str,
    dest: str,
    recipes: Sequence[str | Recipe],
    *,
    max_parallel: int = 1,
    shard_size: int = 5_000_000_000,
    ray_address: str | None = None,
    device: str = "auto",
    on_outcome: Callable[[SyncOutcome], None] | None = None,
) -> SyncSummary:
    """The sync without an orchestrator (the Prefect flow runs the same `sync_one` per pair)."""
    check_destination(source, dest, source_kind="tree")
    chosen = [r if isinstance(r, Recipe) else load_recipe(r) for r in recipes]
    work = [(c, r) for c in find_checkpoints(source) for r in chosen]
    _start_ray_if_work(work, dest, shard_size, ray_address)

    def one(pair: tuple[Checkpoint, Recipe]) -> SyncOutcome:
        try:
            result = sync_one(pair[0], pair[1], dest, shard_size=shard_size, ray_address=ray_address,
                              device=device)
        except Exception as error:  # one failing model does not stop the others
            result = _failed(pair[0], pair[1], error)
        if on_outcome is not None:
            on_outcome(result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, max_parallel), thread_name_prefix="sync") as pool:
        outcomes = tuple(pool.map(one, work))
    return SyncSummary(source_uri=open_storage(source).uri(), dest_uri=open_storage(dest).uri(),
                       outcomes=outcomes)


@task(name="sync-model", cache_policy=NO_CACHE, persist_result=False,
      task_run_name="{checkpoint.name} [{recipe.label}]")
def sync_model_task(
    checkpoint: Checkpoint,
    recipe: Recipe,
    dest: str,
    shard_size: int,
    ray_address: str | None,
    device: str,
) -> SyncOutcome:
    result = sync_one(checkpoint, recipe, dest, shard_size=shard_size, ray_address=ray_address,
                      device=device)
    get_run_logger().info("%s %s [%s]: %s", result.status, checkpoint.name, recipe.label, result.reason)
    return result


@flow(name="sync", log_prints=False)
def sync_flow(
    source: str,
    dest: str,
    recipes: list[str],
    max_parallel: int = 1,
    shard_size: int = 5_000_000_000,
    ray_address: str | None = None,
    device: str = "auto",
    fail_on_error: bool = True,
) -> SyncSummary:
    """Convert every checkpoint under `source` with each recipe unless already published at `dest`.

    `recipes`: preset scheme names (W4A16, FP8, ...) or YAML recipe paths. Up to `max_parallel`
    conversions run at once. With `fail_on_error`, the run ends Failed (after converting
    everything else) when any pair failed.
    """
    check_destination(source, dest, source_kind="tree")
    logger = get_run_logger()
    chosen = [load_recipe(r) for r in recipes]
    checkpoints = find_checkpoints(source)
    logger.info("%d checkpoint(s) under %s, %d recipe(s)", len(checkpoints), source, len(chosen))
    work = [(c, r) for c in checkpoints for r in chosen]
    _start_ray_if_work(work, dest, shard_size, ray_address)  # here, on the flow's (main) thread
    outcomes: list[SyncOutcome] = []
    runner: ThreadPoolTaskRunner[SyncOutcome] = ThreadPoolTaskRunner(max_workers=max(1, max_parallel))
    with runner:
        futures = [
            runner.submit(sync_model_task, parameters={
                "checkpoint": c, "recipe": r, "dest": dest, "shard_size": shard_size,
                "ray_address": ray_address, "device": device,
            })
            for c, r in work
        ]
        for future, (c, r) in zip(futures, work, strict=True):
            try:
                outcomes.append(future.result())
            except Exception as error:  # one failing model does not stop the others
                outcomes.append(_failed(c, r, error))
    summary = SyncSummary(source_uri=open_storage(source).uri(), dest_uri=open_storage(dest).uri(),
                          outcomes=tuple(outcomes))
    create_markdown_artifact(key="sync-summary", markdown=summary.markdown(), description=summary.headline())
    logger.info("%s", summary.text())
    if summary.failed and fail_on_error:
        raise SyncFailed(summary)
    return summary
