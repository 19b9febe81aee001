"""The record an evaluation returns: small, torch-free, safe to import from flows/."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["Evaluation", "Kind", "FIGURE_LABELS"]

Kind = Literal["causal-lm", "encoder"]

FIGURE_LABELS = {
    "mean_kl": "mean KL divergence",
    "p99_kl": "KL divergence, 99th percentile",
    "top1": "top-1 agreement",
    "ppl_original": "perplexity, original",
    "ppl_quantized": "perplexity, quantized",
    "embedding_cosine": "pooled embedding cosine (mean)",
    "embedding_cosine_min": "pooled embedding cosine (min)",
    "hidden_cosine": "hidden state cosine (mean)",
    "hidden_cosine_p1": "hidden state cosine (1st pct)",
}


class Evaluation(BaseModel):
    """Model-level figures of a quantized checkpoint against its original on one text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind
    original: str
    quantized: str
    text: str  # the text's name
    text_sha256: str
    tokens: int  # tokens of the text evaluated
    windows: int
    context: int
    device: str
    dtype: str
    seconds: float  # in all: downloads, loading, tokenizing, running
    tokens_per_s: float  # text tokens per second through both models (loading excluded)
    scored_tokens: int
    # causal LMs
    mean_kl: float | None = None
    p99_kl: float | None = None
    max_kl: float | None = None
    top1: float | None = None
    ppl_original: float | None = None
    ppl_quantized: float | None = None
    # encoders
    embedding_cosine: float | None = None
    embedding_cosine_min: float | None = None
    hidden_cosine: float | None = None
    hidden_cosine_p1: float | None = None
    # Set when the original was itself quantized: what the figures compare against, e.g.
    # "dequantized quantized source (block-FP8 128x128)".
    reference: str | None = None

    def figures(self) -> dict[str, float]:
        """The measured figures that are set, by name (for tables and gates)."""
        return {n: v for n in FIGURE_LABELS if (v := getattr(self, n)) is not None}

    def table(self) -> str:
        """A plain-text table for the terminal."""
        rows = [("model kind", self.kind), ("text", f"{self.text} ({self.tokens} tokens, "
                f"{self.windows} windows of <= {self.context})")]
        for name, value in self.figures().items():
            rows.append((FIGURE_LABELS[name], f"{value:.4%}" if name == "top1" else f"{value:.6g}"))
        if self.reference is not None:
            rows.append(("original", self.reference))
        rows.append(("device", f"{self.device}, {self.dtype}; {self.seconds:.1f} s, "
                     f"{self.tokens_per_s:,.0f} tokens/s"))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
