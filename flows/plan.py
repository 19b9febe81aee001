"""Planning: from headers alone, decide every tensor's fate and cut the output into work units.

A plan is deterministic (same source, recipe, tool version and shard size -> same plan and id),
small per tensor (jobs name a source byte range and an index into the plan's scheme table; the
output tensors are derived from those), and cheap to build for a million tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field

from flows.mixed.summary import MixedSummary
from flows.mtp import mtp_choice, mtp_prefixes
from flows.partners import link_nvfp4_partners
from flows.recipe import Recipe
from flows.sources import SourceSummary, SourceTensor, dense_bytes, read_source
from infra.publish import Publisher
from infra.safetensors import DTYPE_SIZE, Catalog
from infra.storage import Storage
from quantizers import QuantScheme, resolve_scheme
from quantizers.errors import QuantizationError
from quantizers.kernels import compile_floor_for
from workers.units import SAFETENSORS_TO_TORCH, TensorJob, WorkUnit, output_specs

__all__ = [
    "Plan", "build_plan", "job_bytes_in", "loads_with_model", "shard_file_name", "source_identity",
    "TOOL_VERSION",
]

TOOL_VERSION = "0.1.0"

# Bytes a worker needs besides its tensors (interpreter, torch, buffers); and the multiple of the
# largest source tensor a quantization holds at once (weight, float temporaries, stored parts).
_FIXED_MEMORY = 512 << 20
_TENSOR_MEMORY_FACTOR = 4

class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    plan_id: str
    tool_version: str
    source_uri: str
    source_identity: str
    recipe: Recipe
    shard_size: int
    schemes: tuple[QuantScheme, ...]
    units: tuple[WorkUnit, ...]
    side_files: tuple[str, ...]
    source: SourceSummary | None = None  # set when the source itself is quantized or re-laid out
    # The method (rtn, search, hqq) of each entry of `schemes`; empty means all RTN.
    methods: tuple[str, ...] = Field(default=(), exclude_if=lambda v: not v)
    # Mixed precision (flows.mixed): the budget and each quantized tensor's chosen candidate.
    mixed: MixedSummary | None = Field(default=None, exclude_if=lambda v: v is None)
    # Both formats (recipe `gguf:`): the GGUF conversion of the same source, published in `gguf/`
    # of this plan's version (flows.gguf_output.companion).
    gguf: Plan | None = Field(default=None, exclude_if=lambda v: v is None)
    # Each source shard file's (key, size, ETag or SHA-256) as planned: publishing checks that
    # they have not changed since (flows.source_check).
    source_files: tuple[tuple[str, int, str | None], ...] = Field(default=(), exclude_if=lambda v: not v)
    # Where the units are staged at a destination (`identify_plan`).
    staging_id: str

    def publisher(self, dest: Storage) -> Publisher:
        """This plan's staging and commit at `dest` (the destination's root)."""
        return Publisher(dest, "", self.staging_id)

    def method_of(self, scheme_index: int) -> str:
        return self.methods[scheme_index] if self.methods else "rtn"

    @property
    def bytes_in(self) -> int:
        return sum(u.bytes_in for u in self.units)

    @property
    def bytes_out(self) -> int:
        return sum(u.bytes_out for u in self.units)

    def jobs(self) -> Iterable[TensorJob]:
        for unit in self.units:
            yield from unit.jobs

    def quantized_modules(self) -> list[tuple[str, QuantScheme]]:
        return [(j.module, self.schemes[j.scheme]) for j in self.jobs() if j.scheme is not None]

    def compile_floor(self) -> int:
        """From how many elements this plan's tensors run compiled (quantizers.kernels): decided
        by the tensors the workers quantize, not those they copy."""
        return compile_floor_for(math.prod(j.shape) for j in self.jobs()
                                 if j.scheme is not None and not j.passthrough)


def shard_file_name(index: int, count: int) -> str:
    if count == 1:
        return "model.safetensors"
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


@lru_cache(maxsize=4096)
def _resolve(scheme: QuantScheme, shape: tuple[int, ...]) -> tuple[QuantScheme, str | None]:
    resolution = resolve_scheme(scheme, shape)
    return resolution.scheme, resolution.note


def _output_bytes(job: TensorJob, schemes: tuple[QuantScheme, ...]) -> int:
    total = 0
    for _, dtype, shape in output_specs(job, schemes):
        count = 1
        for d in shape:
            count *= d
        total += count * DTYPE_SIZE[dtype]
    return total


# Side files that change nothing a model loads: documentation and pictures (a model card edited
# on the hub is not a new version to convert).
_DOCUMENTS = (".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".pdf")
_DOCUMENT_STEMS = ("license", "notice", "use_policy", "readme")


def loads_with_model(key: str) -> bool:
    """Whether the side file `key` is read when the model is loaded or served (config, generation
    config, tokenizer files, chat template), as opposed to documentation."""
    name = key.rsplit("/", 1)[-1].lower()
    return not name.endswith(_DOCUMENTS) and not name.startswith(_DOCUMENT_STEMS)


def source_identity(catalog: Catalog, sizes: dict[str, tuple[int, str | None]]) -> str:
    """A hash of what the source is: each shard file's key, size, ETag or SHA-256, tensor count.

    On S3 the ETag changes with the content, so a re-uploaded checkpoint with new weights gets a
    new identity and an unchanged one keeps it. Local storage reports an ETag made of inode, mtime
    and size, so a copied or rewritten file counts as new (conservative: it is converted again).
    """
    digest = hashlib.sha256()
    for key in sorted(catalog.files):
        header = catalog.files[key]
        size, tag = sizes.get(key, (header.file_size, None))
        digest.update(f"{key}\0{size}\0{tag or ''}\0{len(header.tensors)}\0{header.data_start}\n".encode())
    return digest.hexdigest()


def _decide(
    wanted: QuantScheme,
    method: str,
    shape: tuple[int, ...],
    schemes: list[tuple[QuantScheme, str]],
    scheme_index: dict[tuple[QuantScheme, str], int],
) -> tuple[int | None, str | None]:
    """(index into the plan's scheme table, shape note) for a weight; (None, None) if refused."""
    try:
        used, note = _resolve(wanted, shape)
    except QuantizationError:
        return None, None  # refused shapes stay as they are
    entry = (used, method)
    if entry not in scheme_index:
        scheme_index[entry] = len(schemes)
        schemes.append(entry)
    return scheme_index[entry], note


def job_bytes_in(job: TensorJob) -> int:
    """Source bytes a job reads: all parts of a quantized source weight, else its one range."""
    return sum(p.end - p.begin for p in job.parts) if job.parts else job.end - job.begin


def _held(job: TensorJob) -> int:
    if job.source is None:
        return job.end - job.begin
    return dense_bytes(SourceTensor(job.name, job.file, job.begin, job.end, job.dtype, job.shape, job.source))


def identify_plan(
    catalog: Catalog,
    file_tags: dict[str, tuple[int, str | None]] | None,
    recipe: Recipe,
    shard_size: int,
    assign_key: str | None = None,
) -> tuple[str, str, str]:
    """(the source's identity, the plan id, the staging id): the plan id hashes what decides the
    output's bytes, the source, the recipe, the tool version, the shard size and a budget's
    assignment if any; the staging id (where units are staged, so where a re-run resumes from)
    the same without the recipe's per-tensor gates, which only decide whether a unit passes: a run
    stopped by a gate resumes from its staged units once the gate is relaxed.

    `file_tags` may tag side files too (`loads_with_model`): the plan id then covers them, since
    the output carries copies of them (a chat template fixed in tokenizer_config.json is a new
    version to publish), but the staging id does not (the shards made from the weights stay)."""
    identity = source_identity(catalog, file_tags or {})
    keyed: dict[str, object] = {"source": identity, "recipe": recipe.plan_key(), "tool": TOOL_VERSION,
                                "shard_size": shard_size}
    if assign_key is not None:
        keyed["assignment"] = assign_key
    side = sorted([key, *tag] for key, tag in (file_tags or {}).items() if key not in catalog.files)

    def digest(key: dict[str, object]) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    plan_id = digest({**keyed, "side_files": side} if side else keyed)
    return identity, plan_id, digest({**keyed, "recipe": recipe.plan_key(tensor_gates=False)})


def cut_into_units(
    runs: Iterable[tuple[Sequence[TensorJob], int]],
    shard_size: int,
    file_name: Callable[[int, int], str],
    memory_factor: int = _TENSOR_MEMORY_FACTOR,
) -> tuple[WorkUnit, ...]:
    """Cut runs of jobs, in order, into output shards of at most `shard_size` bytes (a run larger
    than that gets a shard of its own): one work unit per shard, with its byte counts and memory
    estimate. A run is jobs that must share a shard (one job, or a GGUF tensor's pieces) and the
    bytes it writes; `file_name(index, count)` names the shards."""
    groups: list[list[TensorJob]] = []
    sizes_out: list[int] = []
    for run, size in runs:
        if not groups or sizes_out[-1] + size > shard_size:
            groups.append([])
            sizes_out.append(0)
        groups[-1].extend(run)
        sizes_out[-1] += size
    return tuple(
        WorkUnit.model_construct(
            index=i,
            file_name=file_name(i, len(groups)),
            jobs=tuple(group),
            bytes_in=sum(job_bytes_in(j) for j in group),
            bytes_out=sizes_out[i],
            memory_bytes=_FIXED_MEMORY + memory_factor * max((_held(j) for j in group), default=0),
        )
        for i, group in enumerate(groups)
    )


def _carried_over(
    tensor: SourceTensor, index: int | None, schemes: list[tuple[QuantScheme, str]]
) -> bool:
    """Whether the target stores exactly what the source holds: block-FP8 -> FP8 with the same tiles
    (the fp8 bytes and float32 scales are then copied, only renamed)."""
    if index is None or tensor.source is None or tensor.source.kind != "block-fp8":
        return False
    scheme = schemes[index][0]  # (scheme, method): an exact copy has no scales to choose
    return scheme.format == "float-quantized" and scheme.block_structure == tensor.source.block


def build_plan(
    catalog: Catalog,
    recipe: Recipe,
    *,
    shard_size: int = 5_000_000_000,
    file_tags: dict[str, tuple[int, str | None]] | None = None,
    config: dict[str, object] | None = None,
    assign: dict[str, tuple[QuantScheme, str]] | None = None,
    assign_key: str | None = None,
) -> Plan:
    """Plan a conversion of `catalog` with `recipe`, cutting output shards near `shard_size` bytes.

    `file_tags` maps a shard key to (size, ETag or SHA-256) from a listing, for the source identity.
    `config` is the source's config.json: a quantized source is recognised from it (see
    `flows.sources`), and its weights are dequantized on the workers. `assign` gives some tensors
    their (scheme, method) instead of the recipe (mixed precision; `assign_key` names it in the id).
    """
    if recipe.format == "gguf":
        from flows.gguf_output.plan import build_gguf_plan

        return build_gguf_plan(catalog, recipe, shard_size=shard_size, file_tags=file_tags, config=config)
    schemes: list[tuple[QuantScheme, str]] = []
    scheme_index: dict[tuple[QuantScheme, str], int] = {}
    decisions: dict[tuple[int, str, tuple[int, ...]], tuple[int | None, str | None]] = {}
    jobs: list[TensorJob] = []
    # File order, then offset order: each worker reads its files front to back.
    summary, entries = read_source(config, catalog)
    mtp = mtp_prefixes(config)
    for info in entries:
        choice = recipe.choice_for(info.name, info.shape) if info.dtype in SAFETENSORS_TO_TORCH else None
        if mtp and info.name.startswith(mtp):
            choice = mtp_choice(info)  # DeepSeek's draft layers: as the source holds them
        elif assign is not None and choice is not None:
            choice = assign.get(info.name, choice)
        index = note = None
        if choice is not None and info.dtype in ("BF16", "F16", "F32"):
            wanted, method = choice
            # Schemes come from the recipe's few objects: key by identity, not by hashing a model.
            key = (id(wanted), method, info.shape)
            decided = decisions.get(key)
            if decided is None:
                decided = decisions[key] = _decide(wanted, method, info.shape, schemes, scheme_index)
            index, note = decided
        job = TensorJob(info.name, info.file, info.begin, info.end, info.dtype, info.shape, index, note,
                        info.source, info.parts, _carried_over(info, index, schemes))
        jobs.append(job)
    scheme_table = tuple(scheme for scheme, _ in schemes)
    methods = tuple(method for _, method in schemes)
    jobs = link_nvfp4_partners(jobs, scheme_table)
    sizes: dict[tuple[int | None, tuple[int, ...], str], int] = {}

    def output_bytes(job: TensorJob) -> int:
        size_key = (job.scheme, job.shape, job.dtype)
        out = sizes.get(size_key)
        if out is None:
            out = sizes[size_key] = _output_bytes(job, scheme_table)
        return out

    units = cut_into_units((((job,), output_bytes(job)) for job in jobs), shard_size, shard_file_name)
    identity, plan_id, staging_id = identify_plan(catalog, file_tags, recipe, shard_size, assign_key)
    return Plan.model_construct(
        plan_id=plan_id,
        staging_id=staging_id,
        tool_version=TOOL_VERSION,
        source_uri=catalog.uri,
        source_identity=identity,
        recipe=recipe,
        shard_size=shard_size,
        schemes=scheme_table,
        units=units,
        side_files=catalog.side_files,
        source=summary if summary.quantized or summary.fused_experts_split else None,
        # Empty when all RTN, so an RTN plan serialises exactly as it always did.
        methods=methods if any(m != "rtn" for m in methods) else (),
    )
