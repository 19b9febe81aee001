"""NVFP4 partners: weights an inference engine fuses into one matmul must share one global scale.

vLLM concatenates q/k/v and gate/up (per expert too) into one weight with one NVFP4 global scale;
compressed-tensors' writers give the partners the same one, from the largest magnitude of all.
The planner links each NVFP4 job to its partners, wherever the shard cut puts them; the worker
reads the partners' magnitudes (a cheap pre-pass, cached per unit) before quantizing.
"""

from __future__ import annotations

import dataclasses
import re

from quantizers import QuantScheme
from workers.units import TensorJob

__all__ = ["link_nvfp4_partners", "partner_key"]

_PARTNERS = re.compile(
    r"(?P<prefix>.*)\.(?:(?P<qkv>q_proj|k_proj|v_proj)|(?P<mlp>gate_proj|up_proj))\.weight$"
)


def partner_key(name: str) -> tuple[str, str] | None:
    """(module prefix, group) of a weight that has fused partners, else None."""
    match = _PARTNERS.fullmatch(name)
    if match is None:
        return None
    return match["prefix"], "qkv" if match["qkv"] else "gate_up"


def link_nvfp4_partners(jobs: list[TensorJob], schemes: tuple[QuantScheme, ...]) -> list[TensorJob]:
    """`jobs` with `partners` set on every NVFP4 job whose fusion partners are NVFP4 too."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, job in enumerate(jobs):
        if job.scheme is None or schemes[job.scheme].format != "nvfp4-pack-quantized":
            continue
        key = partner_key(job.name)
        if key is not None:
            groups.setdefault(key, []).append(i)
    linked = list(jobs)
    for members in groups.values():
        if len(members) < 2:
            continue
        for i in members:
            others = tuple(jobs[j] for j in members if j != i)
            linked[i] = dataclasses.replace(jobs[i], partners=others)
    return linked
