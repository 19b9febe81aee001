"""Mixed precision under a size budget: one candidate scheme per tensor, chosen from measurements.

`budget` (what a budget is, the default candidates), `sensitivity` (the role/depth prior),
`solve` (the pure knapsack), `summary` (what the plan records), `measure` (the Ray driver of the
measure pass, whose tasks are `workers.measure_unit`), `planner` (measure, solve, re-plan) and
`report` (plan lines, report section, per-layer chart). No torch here: the tensor work runs on
the workers.
"""

from __future__ import annotations

__all__: list[str] = []
