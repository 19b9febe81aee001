"""Per-token measures between an original and a quantized model's outputs (pure tensor math).

Accumulators keep one small float per token (KL, agreement, NLL, cosine), never logits, so an
evaluation of any length holds one window batch of logits at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["CausalAccumulator", "EncoderAccumulator", "token_kl"]


def token_kl(reference_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_other) per position for logits [..., vocab], computed in float32: [...]."""
    log_p = reference_logits.float().log_softmax(-1)
    log_q = other_logits.float().log_softmax(-1)
    # Clamped at 0: float rounding can give -1e-9 for identical distributions.
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)


def _percentile(values: torch.Tensor, q: float) -> float:
    if values.numel() == 0:
        return math.nan
    return float(torch.quantile(values.double(), q))


@dataclass
class CausalAccumulator:
    """KL, top-1 agreement and the NLL of both models over every scored position."""

    kl: list[torch.Tensor] = field(default_factory=list)
    agree: list[torch.Tensor] = field(default_factory=list)
    nll_ref: list[torch.Tensor] = field(default_factory=list)
    nll_other: list[torch.Tensor] = field(default_factory=list)

    def add(self, reference: torch.Tensor, other: torch.Tensor, ids: torch.Tensor, first: int) -> None:
        """Logits [batch, length, vocab] of both models on `ids` [batch, length].

        KL and agreement are scored on every position from `first` (positions after a BOS), the
        NLL on predicting ids[:, t+1] from position t.
        """
        # One log-softmax per model serves KL, agreement and NLL (the vocab pass dominates).
        log_p = reference[:, first:].float().log_softmax(-1)
        log_q = other[:, first:].float().log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)
        self.kl.append(kl.reshape(-1).cpu())
        self.agree.append((log_p.argmax(-1) == log_q.argmax(-1)).reshape(-1).cpu())
        labels = ids[:, first + 1 :].unsqueeze(-1)
        if labels.shape[1]:
            nll_p = -log_p[:, :-1].gather(-1, labels).squeeze(-1)
            nll_q = -log_q[:, :-1].gather(-1, labels).squeeze(-1)
            self.nll_ref.append(nll_p.reshape(-1).double().cpu())
            self.nll_other.append(nll_q.reshape(-1).double().cpu())

    def summary(self) -> dict[str, float | int]:
        kl = torch.cat(self.kl) if self.kl else torch.zeros(0)
        agree = torch.cat(self.agree) if self.agree else torch.zeros(0, dtype=torch.bool)
        nll_ref = torch.cat(self.nll_ref) if self.nll_ref else torch.zeros(0, dtype=torch.float64)
        nll_other = torch.cat(self.nll_other) if self.nll_other else torch.zeros(0, dtype=torch.float64)
        return {
            "scored_tokens": int(kl.numel()),
            "mean_kl": float(kl.double().mean()) if kl.numel() else math.nan,
            "p99_kl": _percentile(kl, 0.99),
            "max_kl": float(kl.max()) if kl.numel() else math.nan,
            "top1": float(agree.double().mean()) if agree.numel() else math.nan,
            "ppl_original": math.exp(float(nll_ref.mean())) if nll_ref.numel() else math.nan,
            "ppl_quantized": math.exp(float(nll_other.mean())) if nll_other.numel() else math.nan,
        }


@dataclass
class EncoderAccumulator:
    """Cosine similarity of per-token hidden states and of mean-pooled embeddings."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    pooled: list[torch.Tensor] = field(default_factory=list)

    def add(self, reference: torch.Tensor, other: torch.Tensor) -> None:
        """Last hidden states [batch, length, hidden] of both models (no padding)."""
        ref, oth = reference.float(), other.float()
        self.hidden.append(torch.nn.functional.cosine_similarity(ref, oth, dim=-1).reshape(-1).cpu())
        self.pooled.append(torch.nn.functional.cosine_similarity(ref.mean(1), oth.mean(1), dim=-1).cpu())

    def summary(self) -> dict[str, float | int]:
        hidden = torch.cat(self.hidden) if self.hidden else torch.zeros(0)
        pooled = torch.cat(self.pooled) if self.pooled else torch.zeros(0)
        return {
            "scored_tokens": int(hidden.numel()),
            "embedding_cosine": float(pooled.double().mean()) if pooled.numel() else math.nan,
            "embedding_cosine_min": float(pooled.min()) if pooled.numel() else math.nan,
            "hidden_cosine": float(hidden.double().mean()) if hidden.numel() else math.nan,
            "hidden_cosine_p1": _percentile(hidden, 0.01),
        }
