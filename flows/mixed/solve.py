"""The mixed-precision solve: one option per item, least total damage, total bits within a budget.

Pure Python (no torch): the planner hands it, per item (a tensor, or fusion partners that must
share a scheme), the damage and the exact stored bits of each option. It is a multiple-choice
knapsack. Three passes, each cheap for a million items:

1. Lagrangian path. Each item's options are reduced to their lower convex hull in
   (bits, damage); starting from every item's cheapest option, upgrades are taken in order of
   damage saved per extra bit, which is exactly the sequence of Lagrangian solutions
   min damage + lambda * bits as lambda falls; an upgrade that no longer fits is skipped.
2. Fill: the budget the hull path leaves is spent on the best remaining upgrades, off-hull options
   included, best ratio first, until none fits or none helps.
3. Uniform check: every candidate used uniformly (where an item offers it) that fits the budget,
   improved by the same fill, is also a solution; the least damaging of all is returned. So at a
   budget equal to a uniform scheme's size the result is never worse than that scheme.

The budget is in whole bits and never exceeded: costs are exact stored bits (scales included).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Option", "Item", "BudgetTooSmall", "solve", "total"]


@dataclass(frozen=True, slots=True)
class Option:
    """One way to store an item: which candidate, its weighted damage and its exact stored bits."""

    candidate: int
    damage: float
    bits: int


@dataclass(frozen=True, slots=True)
class Item:
    """What gets one option: a tensor, or fusion partners that must share their scheme."""

    key: str
    options: tuple[Option, ...]


class BudgetTooSmall(ValueError):
    """The budget is below what the cheapest option of every item costs."""


def total(items: Sequence[Item], choice: Sequence[int]) -> tuple[float, int]:
    """(total damage, total bits) of choosing option `choice[i]` of item i."""
    damage = sum(item.options[c].damage for item, c in zip(items, choice, strict=True))
    bits = sum(item.options[c].bits for item, c in zip(items, choice, strict=True))
    return damage, bits


def _cheapest(item: Item) -> int:
    return min(range(len(item.options)), key=lambda i: (item.options[i].bits, item.options[i].damage))


def _hull(item: Item) -> list[int]:
    """Indices of the options on the lower convex hull of (bits, damage), cheapest first."""
    order = sorted(range(len(item.options)), key=lambda i: (item.options[i].bits, item.options[i].damage))
    frontier: list[int] = []
    for i in order:  # keep only options that lower the damage as bits grow
        if not frontier or item.options[i].damage < item.options[frontier[-1]].damage:
            if frontier and item.options[i].bits == item.options[frontier[-1]].bits:
                frontier[-1] = i
            else:
                frontier.append(i)
    hull: list[int] = []
    for i in frontier:
        while len(hull) >= 2:
            a, b, c = (item.options[j] for j in (hull[-2], hull[-1], i))
            # b is above the segment a-c: its saving per bit is worse than going straight to c.
            if (a.damage - b.damage) * (c.bits - a.bits) <= (a.damage - c.damage) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _ratio(item: Item, current: int, upgrade: int) -> float:
    now, then = item.options[current], item.options[upgrade]
    return (now.damage - then.damage) / max(then.bits - now.bits, 1)


def _lagrangian(items: Sequence[Item], budget: int) -> list[int]:
    choice = [_cheapest(item) for item in items]
    spent = sum(item.options[c].bits for item, c in zip(items, choice, strict=True))
    hulls = [_hull(item) for item in items]
    position = [h.index(c) if c in h else 0 for h, c in zip(hulls, choice, strict=True)]
    heap: list[tuple[float, int]] = []
    for i, hull in enumerate(hulls):
        if position[i] + 1 < len(hull):
            heapq.heappush(heap, (-_ratio(items[i], choice[i], hull[position[i] + 1]), i))
    while heap:
        _, i = heapq.heappop(heap)
        upgrade = hulls[i][position[i] + 1]
        extra = items[i].options[upgrade].bits - items[i].options[choice[i]].bits
        if spent + extra > budget:
            continue  # this item stops here; cheaper upgrades of others may still fit
        spent += extra
        choice[i] = upgrade
        position[i] += 1
        if position[i] + 1 < len(hulls[i]):
            heapq.heappush(heap, (-_ratio(items[i], choice[i], hulls[i][position[i] + 1]), i))
    return choice


def _fill(items: Sequence[Item], choice: list[int], budget: int) -> list[int]:
    """Spend what is left on the best upgrades (any option that lowers the damage), until none fits."""
    spent = total(items, choice)[1]
    while True:
        best: tuple[float, int, int] | None = None
        for i, item in enumerate(items):
            now = item.options[choice[i]]
            for j, option in enumerate(item.options):
                extra = option.bits - now.bits
                saving = now.damage - option.damage
                if saving <= 0 or spent + extra > budget:
                    continue
                ratio = saving / extra if extra > 0 else float("inf")
                if best is None or ratio > best[0]:
                    best = (ratio, i, j)
        if best is None:
            return choice
        _, i, j = best
        spent += items[i].options[j].bits - items[i].options[choice[i]].bits
        choice[i] = j


def _uniform(items: Sequence[Item], candidate: int) -> list[int] | None:
    """Every item on `candidate` (items that do not offer it: their cheapest option); None if none does."""
    choice, used = [], False
    for item in items:
        match = [i for i, o in enumerate(item.options) if o.candidate == candidate]
        used |= bool(match)
        choice.append(match[0] if match else _cheapest(item))
    return choice if used else None


def solve(items: Sequence[Item], budget: int, *, fill_limit: int = 20_000) -> list[int]:
    """Per item, the index of its chosen option; total bits <= `budget`, total damage least found.

    `fill_limit`: above this many items the fill pass (quadratic) is skipped; the hull path alone is
    then within one item's upgrade of the Lagrangian optimum.
    """
    floor = sum(item.options[_cheapest(item)].bits for item in items)
    if floor > budget:
        raise BudgetTooSmall(f"budget {budget} bits is below the cheapest candidate's {floor} bits")
    solutions = [_lagrangian(items, budget)]
    candidates = sorted({o.candidate for item in items for o in item.options})
    for candidate in candidates:
        uniform = _uniform(items, candidate)
        if uniform is not None and total(items, uniform)[1] <= budget:
            solutions.append(uniform)
    if len(items) <= fill_limit:
        solutions = [_fill(items, list(s), budget) for s in solutions]
    return min(solutions, key=lambda s: total(items, s))
