"""Mixed precision under a budget: measure every candidate on the workers, solve, plan the result.

`plan_mixed` turns the recipe's plain plan (which tensors are quantized at all) into one where
each quantized tensor has the candidate the solve chose. Steps:

1. exact stored bits of every (tensor, candidate), from the headers (the same output specs the
   plan sizes shards with), and the budget in bits for the quantized tensors; a budget below the
   cheapest choice is refused here, before anything is read;
2. the measure pass on Ray (`flows.mixed.measure`, one task per unit) gives each tensor's error
   under each candidate;
3. items: fusion partners (q/k/v, gate/up: engines fuse them into one matmul and need one scheme)
   form one item, every other tensor its own; an item's damage under a candidate is the sum of
   sensitivity x error, times the candidate's format weight (`flows.mixed.sensitivity`); routers,
   norms, embeddings and lm_head may only take candidates of 8 bits or more;
4. `flows.mixed.solve` picks one candidate per item; the plan is rebuilt with that assignment,
   and its id covers the assignment, so a re-run that measures the same errors (deterministic on a
   device type and cluster shape: the measure tasks take `flows.execute.unit_threads` threads, as
   conversion's do, and sums split across threads differ in the last bits) resumes the same
   staged units.

The measurement is kept for the process, so planning twice (the CLI sizes its progress bar from
the plan, then converts) measures once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable

from flows.execute import ClusterInfo
from flows.mixed.budget import describe_budget
from flows.mixed.measure import measure_units
from flows.mixed.sensitivity import format_weight, keeps_high, layer_count, sensitivity
from flows.mixed.solve import BudgetTooSmall, Item, Option, solve, total
from flows.mixed.summary import MixedSummary, TensorChoice, UniformPoint
from flows.partners import partner_key
from flows.plan import Plan
from flows.recipe import Recipe, RecipeError
from infra.safetensors import DTYPE_SIZE
from infra.sizes import format_decimal_size
from quantizers import QuantScheme, resolve_scheme
from workers.measure_unit import MeasureContext, TensorMeasure
from workers.units import TensorJob, output_specs

__all__ = ["plan_mixed", "Assignment", "candidate_label"]

# tensor name -> (scheme as the recipe names it, method); the plan resolves shapes as usual.
Assignment = dict[str, tuple[QuantScheme, str]]
_MEASURED: dict[str, dict[str, TensorMeasure]] = {}


def candidate_label(scheme: QuantScheme, method: str) -> str:
    return f"{scheme.name} {scheme.describe()} ({method})"


def _job_bytes(job: TensorJob, schemes: tuple[QuantScheme, ...]) -> int:
    return sum(math.prod(shape) * DTYPE_SIZE[dtype] for _, dtype, shape in output_specs(job, schemes))


def _candidate_bits(job: TensorJob, candidate: QuantScheme) -> int:
    resolved = resolve_scheme(candidate, job.shape).scheme
    return 8 * _job_bytes(dataclasses.replace(job, scheme=0, partners=()), (resolved,))


def _budget_bits(recipe: Recipe, plan: Plan, targeted: list[TensorJob]) -> int:
    if recipe.target_bits is not None:
        return math.floor(recipe.target_bits * sum(math.prod(j.shape) for j in targeted))
    assert recipe.target_size is not None
    names = {j.name for j in targeted}
    kept = sum(_job_bytes(j, plan.schemes) for j in plan.jobs() if j.name not in names)
    return 8 * (recipe.target_size - kept)


def _refuse(recipe: Recipe, budget: int, floor: int, elements: int) -> RecipeError:
    given = describe_budget(recipe.target_bits, recipe.target_size)
    if recipe.target_bits is not None:
        need = f"{floor / elements:.4f} bits per quantized weight (every tensor on its cheapest candidate)"
    else:
        size = math.ceil((recipe.target_size or 0) + (floor - budget) / 8)
        need = f"{format_decimal_size(size)} in all ({size} bytes, every tensor on its cheapest candidate)"
    return RecipeError(f"budget of {given} is below the smallest the candidates can store: {need}")


def plan_mixed(
    base: Plan,
    recipe: Recipe,
    *,
    rebuild: Callable[[Assignment, str], Plan],
    cluster: Callable[[], ClusterInfo],
    device: str = "auto",
    max_rows: int = 4096,
) -> Plan:
    """The plan with one candidate per quantized tensor, within the recipe's budget."""
    choices = recipe.candidate_choices()
    candidates = tuple(c.resolve() for c in choices)
    methods = tuple(c.method for c in choices)
    labels = tuple(candidate_label(s, m) for s, m in zip(candidates, methods, strict=True))
    targeted = [j for j in base.jobs() if j.scheme is not None and not j.passthrough]
    if not targeted:
        raise RecipeError("mixed precision: the recipe quantizes no tensor of this checkpoint")
    names = [j.name for j in targeted]
    layers = layer_count(names)
    bits = {j.name: tuple(_candidate_bits(j, c) for c in candidates) for j in targeted}
    allowed = {
        j.name: tuple(i for i, c in enumerate(candidates) if not keeps_high(j.module) or c.num_bits >= 8)
        for j in targeted
    }
    groups: dict[str, list[TensorJob]] = {}
    for job in targeted:
        fused = partner_key(job.name)
        groups.setdefault(f"{fused[0]}.{fused[1]}" if fused else job.name, []).append(job)
    budget = _budget_bits(recipe, base, targeted)
    elements = sum(math.prod(j.shape) for j in targeted)

    def cheapest(members: list[TensorJob]) -> int:
        usable = set.intersection(*(set(allowed[m.name]) for m in members)) or set(range(len(candidates)))
        return min(sum(bits[m.name][c] for m in members) for c in usable)

    floor = sum(cheapest(members) for members in groups.values())
    if floor > budget:
        raise _refuse(recipe, budget, floor, elements)

    # What decides the measurements: the source, the tensors measured, the candidates (not the budget).
    cache_key = json.dumps([base.source_identity, base.source_uri, sorted(names), labels, max_rows, device])
    measured = _MEASURED.get(cache_key)
    if measured is None:
        context = MeasureContext(source_uri=base.source_uri, candidates=candidates, methods=methods,
                                 device=device, max_rows=max_rows, compile_min_elements=base.compile_floor())
        measured = _MEASURED[cache_key] = measure_units(base.units, context, cluster=cluster())
    weight = {name: sensitivity(name, layers) for name in names}
    items: list[Item] = []
    for group, members in groups.items():
        usable = set.intersection(*(set(allowed[m.name]) for m in members))
        options = []
        for c in sorted(usable):
            errors = [measured[m.name].errors[c] for m in members]
            if any(e is None for e in errors):
                continue
            damage = format_weight(candidates[c]) * sum(
                weight[m.name] * e for m, e in zip(members, errors, strict=True) if e is not None)
            options.append(Option(candidate=c, damage=damage, bits=sum(bits[m.name][c] for m in members)))
        if not options:
            raise RecipeError(f"mixed precision: no candidate can store {', '.join(m.name for m in members)}")
        items.append(Item(key=group, options=tuple(options)))
    try:
        picked = solve(items, budget)
    except BudgetTooSmall as error:  # the floor check above should have caught it
        raise _refuse(recipe, budget, floor, elements) from error
    damage, used = total(items, picked)
    assignment: Assignment = {}
    tensors = []
    for item, index, members in zip(items, picked, groups.values(), strict=True):
        c = item.options[index].candidate
        for m in members:
            assignment[m.name] = (candidates[c], methods[c])
            measured_error = measured[m.name].errors[c]
            tensors.append(TensorChoice(name=m.name, candidate=c, error=measured_error or 0.0,
                                        sensitivity=weight[m.name], bits=bits[m.name][c],
                                        elements=math.prod(m.shape)))
    uniform = []
    for c, label in enumerate(labels):
        every = [item for item in items if any(o.candidate == c for o in item.options)]
        if len(every) == len(items):
            chosen = [next(i for i, o in enumerate(item.options) if o.candidate == c) for item in items]
            u_damage, u_bits = total(items, chosen)
            uniform.append(UniformPoint(candidate=label, bits_per_weight=u_bits / elements, damage=u_damage))
    digest = hashlib.sha256(json.dumps(sorted((t.name, labels[t.candidate]) for t in tensors)).encode())
    plan = rebuild(assignment, digest.hexdigest()[:16])
    spent = 8 * sum(_job_bytes(j, plan.schemes) for j in plan.jobs() if j.name in assignment)
    if spent != used or used > budget:  # the plan stores exactly what the solve counted
        raise RecipeError(f"mixed precision: the plan stores {spent} bits, the solve counted {used} "
                          f"of a {budget}-bit budget")
    summary = MixedSummary(
        budget=describe_budget(recipe.target_bits, recipe.target_size), budget_bits=budget, bits_used=used,
        damage=damage, candidates=labels, uniform=tuple(uniform),
        tensors=tuple(sorted(tensors, key=lambda t: t.name)),
        rows_sampled=sum(1 for j in targeted if measured[j.name].rows_measured < j.shape[0]),
    )
    return plan.model_copy(update={"mixed": summary})
