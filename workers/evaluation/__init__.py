"""Model-level evaluation of a quantized checkpoint against its original.

    from workers.evaluation.evaluate import evaluate
    result = evaluate("/models/llama", "s3://bucket/llama-w4a16")
    result.mean_kl, result.top1, result.ppl_original, result.ppl_quantized

Causal LMs get the KL divergence of the quantized model's next-token distribution from the
original's (mean and 99th percentile), top-1 agreement and both perplexities; encoders (BERT-like,
e.g. MiniLM) get the cosine similarity of pooled embeddings and of hidden states. Both run on a
fixed text (`data/python-reference.txt`, or a file/URI) in windows, so memory stays bounded.

This package's __init__ and `records` import no torch (flows/ use the record); `evaluate` and
`measures` do.
"""

from workers.evaluation.errors import EvaluationError
from workers.evaluation.records import Evaluation

__all__ = ["Evaluation", "EvaluationError"]
