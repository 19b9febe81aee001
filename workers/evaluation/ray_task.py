"""The Ray wrapping of the evaluation: one task, on a GPU when the cluster has one."""

from __future__ import annotations

import ray

from workers.evaluation.evaluate import evaluate
from workers.evaluation.records import Evaluation

__all__ = ["evaluate_remote"]


def _evaluate_quietly(original: str, quantized: str, **options: object) -> Evaluation:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars of loading would flood the driver's log
    return evaluate(original, quantized, **options)  # type: ignore[arg-type]


# No retries: an evaluation that failed (e.g. out of memory) fails the same way again.
evaluate_remote = ray.remote(max_retries=0)(_evaluate_quietly)
