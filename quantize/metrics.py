"""Quality metrics of a quantized part: SQNR of features, perplexity of held-out text."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .streams import Stream

__all__ = ["sqnr_db", "perplexity"]


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref = ref.to(torch.float64)
    noise = (ref - test.to(torch.float64)).pow(2).sum()
    sig = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(sig / noise))


def perplexity(causal_lm, stream: Stream, labels: list[torch.Tensor], device) -> float:
    """exp(mean next-token NLL) of the final hidden states in ``stream`` (labels: the token ids of each batch)."""
    norm, head = causal_lm.model.norm, causal_lm.lm_head
    homes = [next(norm.parameters()).device, next(head.parameters()).device]
    norm.to(device)
    head.to(device)
    nll, count = 0.0, 0
    try:
        with torch.no_grad():
            for (x, _), ids in zip(stream, labels):
                ids = ids.to(device)
                for b in range(x.shape[0]):
                    logits = head(norm(x[b:b + 1])).float()[0, :-1]
                    nll += float(nn.functional.cross_entropy(logits, ids[b, 1:], reduction="sum"))
                    count += ids.shape[1] - 1
    finally:
        norm.to(homes[0])
        head.to(homes[1])
    return math.exp(nll / max(count, 1))
