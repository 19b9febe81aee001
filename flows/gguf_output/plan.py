"""Planning a GGUF conversion (`format: gguf`): every tensor's GGUF name, type and place, from headers.

The same plan -> work units -> workers -> staging -> publish path as compressed-tensors output;
what differs is decided here, from config.json and the safetensors headers alone:

- the architecture: one of `infra.gguf.model.FAMILIES`, else refused with one line naming it and
  the supported ones (before anything is read or written);
- each tensor's GGUF name (the `gguf` package's name maps) and type: the scheme's type for 2-D
  weights, or llama.cpp's rule for the Q4_K_M / Q5_K_M mixes (`quantizers.gguf.mixes`), with its
  fallback for rows a block does not divide; norms, biases and other 1-D tensors stay F32, as
  llama.cpp keeps them; tensors llama.cpp does not load (rotary inverse frequencies) are left out;
- the splits: consecutive GGUF tensors cut near `shard_size` bytes, one work unit each, named as
  llama.cpp's loader expects (`model-00001-of-00003.gguf`; one split is `model.gguf`). The experts of
  one MoE layer, merged into one GGUF tensor, always land in the same split, whether the source
  holds them per expert or fused in 3-D (`flows.sources` splits those into per-expert byte ranges).

Every split's header and tensor offsets follow from this plan (`workers.gguf_unit`), so the
workers write the splits independently and a re-run resumes split by split.
"""

from __future__ import annotations

import math
from typing import Any

from flows.plan import TOOL_VERSION, Plan, cut_into_units, identify_plan
from flows.recipe import Recipe
from flows.sources import SourceError, read_source
from infra.errors import CheckpointError
from infra.gguf import split_file_name
from infra.gguf.model import check_config, expert_count, family_for, map_tensor
from infra.gguf.tokenizer import tokenizer_metadata
from infra.safetensors import Catalog
from infra.storage import open_storage
from quantizers.gguf import row_bytes
from quantizers.gguf.mixes import GGUF_SCHEMES, mix_type
from workers.gguf_units import GGUFTarget
from workers.records import UnitContext
from workers.units import SAFETENSORS_TO_TORCH, TensorJob

__all__ = ["build_gguf_plan", "gguf_context", "gguf_tensor_count", "GGUF_SCHEMES"]

# A worker holds the weight, its float32 copy, the packed bytes and the read-back copy at once.
_TENSOR_MEMORY_FACTOR = 6


def _target(job_name: str, shape: tuple[int, ...], scheme: str, config: dict[str, Any], family: Any,
            tied: bool) -> GGUFTarget | None:
    mapped = map_tensor(job_name, config, family)
    if mapped is None:
        return None
    layers = int(config["num_hidden_layers"])
    experts = expert_count(config)
    if len(shape) == 1:
        return GGUFTarget(mapped.name, "F32", shape, shape[0] * 4)
    rows, columns = shape[0], math.prod(shape[1:])
    type_name = mix_type(scheme, mapped.name, columns, layers=layers, experts=experts, tied_output=tied)
    if mapped.expert is not None:
        index, count = mapped.expert
        dims = (columns, rows, count)
        return GGUFTarget(mapped.name, type_name, dims, count * rows * row_bytes(type_name, columns), index)
    return GGUFTarget(mapped.name, type_name, (columns, rows), rows * row_bytes(type_name, columns),
                      permute_heads=mapped.permute_heads)


def gguf_tensor_count(plan: Plan) -> int:
    """Tensors of the whole GGUF model (llama.cpp's `split.tensors.count`)."""
    return len({job.gguf.name for job in plan.jobs() if job.gguf is not None})


def build_gguf_plan(
    catalog: Catalog,
    recipe: Recipe,
    *,
    shard_size: int,
    file_tags: dict[str, tuple[int, str | None]] | None,
    config: dict[str, object] | None,
) -> Plan:
    if config is None:
        raise CheckpointError(f"{catalog.uri}: no config.json; GGUF output needs the model's architecture")
    # The architecture first: a model llama.cpp has no graph for is refused for that, not for a
    # hyper-parameter its family happens to lack (BERT's rms_norm_eps).
    family = family_for(config, f"{catalog.uri.rstrip('/')}/config.json")
    check_config(config, f"{catalog.uri.rstrip('/')}/config.json")
    # The first split carries the tokenizer: a missing or unsupported one is refused here, not by
    # the worker writing that split while the other units convert on (hours on a large model).
    vocab_size = config["vocab_size"]
    assert isinstance(vocab_size, int)  # check_config
    tokenizer_metadata(open_storage(catalog.uri), vocab_size)
    # A quantized source (block-FP8, compressed-tensors) is read as the dense weights it means:
    # its jobs carry their scale parts, and the worker dequantizes them as for compressed-tensors.
    summary, entries = read_source(config, catalog)
    names = {entry.name for entry in entries}
    tied = bool(config.get("tie_word_embeddings")) and "lm_head.weight" not in names
    scheme = recipe.scheme.upper()
    groups: dict[str, list[TensorJob]] = {}
    for entry in entries:
        if entry.dtype not in SAFETENSORS_TO_TORCH or entry.dtype not in ("BF16", "F16", "F32"):
            raise SourceError(
                f"{entry.name} (in {entry.file}): dtype {entry.dtype} cannot be written as GGUF")
        target = _target(entry.name, entry.shape, scheme, config, family, tied)
        if target is None:
            continue
        job = TensorJob(entry.name, entry.file, entry.begin, entry.end, entry.dtype, entry.shape,
                        source=entry.source, parts=entry.parts, gguf=target)
        groups.setdefault(target.name, []).append(job)
    units = cut_into_units(
        ((jobs, jobs[0].gguf.nbytes if jobs[0].gguf is not None else 0) for jobs in groups.values()),
        shard_size, split_file_name, memory_factor=_TENSOR_MEMORY_FACTOR,
    )
    identity, plan_id, staging_id = identify_plan(catalog, file_tags, recipe, shard_size)
    return Plan.model_construct(
        plan_id=plan_id,
        staging_id=staging_id,
        tool_version=TOOL_VERSION,
        source_uri=catalog.uri,
        source_identity=identity,
        recipe=recipe,
        shard_size=shard_size,
        schemes=(),
        units=units,
        side_files=catalog.side_files,
        source=summary if summary.quantized else None,
        methods=(),
    )


def gguf_context(plan: Plan, staging_uri: str, device: str) -> UnitContext:
    """What every unit of a GGUF plan needs besides its jobs."""
    gates = plan.recipe.gates
    name = plan.recipe.name or plan.source_uri.rstrip("/").rsplit("/", 1)[-1]
    return UnitContext(
        plan_id=plan.plan_id,
        source_uri=plan.source_uri,
        staging_uri=staging_uri,
        schemes=(),
        # One explicit gate for every type, else the worker's default by bit width.
        min_sqnr_db=() if gates.min_sqnr_db is None else (gates.min_sqnr_db,),
        min_cosine=gates.min_cosine,
        probes=0,
        device=device,
        output_format="gguf",
        gguf_scheme=plan.recipe.scheme.upper(),
        gguf_tensors=gguf_tensor_count(plan),
        model_name=name,
    )
