"""Float32 proposes, float64 decides the near ties: the CPU `fast` loop at float32's speed with float64's answers.

On CPU generation runs in float64 so that the answers do not depend on the CPU (models/numerics.py), but float64
matmuls move twice the bytes of float32 ones, and they are most of a decoding step. A float32 copy of the same
weights (every weight is exactly representable: numerics.float32_copy) gives the same logits up to rounding, far
below the gap between the two best tokens at almost every step; where the gap is wider than twice that rounding,
both precisions pick the same token. So the copy decodes, and where its gap is under NEAR_TIE_MARGIN the row's
whole sequence runs once through the float64 model, whose argmax decides. The tokens are the float64 model's on any
CPU as long as float32's error on a logit stays under half the margin. Every float64 decision measures that error
(the first row of each batch is always decided so, as a sample), and one over ERROR_SHARE of the margin stops
the float32 copy: the batch is answered in float64 alone (generation/__init__.py).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from alpaca_qlora.generation.batching import left_pad
from alpaca_qlora.generation.greedy import forward_last, greedy_tokens

log = logging.getLogger(__name__)

# Logit gap under which float64 decides. float32's error on these models' logits is measured at every decision
# (`near_tie_float32_error_max` in metrics/timing) and kept well below it by ERROR_SHARE.
NEAR_TIE_MARGIN = 0.01
# The share of the margin float32's measured error may reach before the copy is no longer trusted: a quarter,
# where half would already let an error flip a pick.
ERROR_SHARE = 0.25


class Float32TooCoarse(RuntimeError):
    """float32's logits strayed from float64's by more than ERROR_SHARE of the margin on this machine."""


class NearTieCheck:
    """Decides, with the float64 `reference` model, the picks whose float32 logit gap is under `margin`; counts
    the decisions and keeps the largest float32 error seen."""

    def __init__(self, reference: Any, margin: float = NEAR_TIE_MARGIN):
        self.reference = reference  # the transformers model (forward_model), float64
        self.margin = margin
        self.decisions = 0
        self.error_max = 0.0
        self.dropped = False  # set where the copy was found too coarse and float64 answered alone

    def near_ties(self, logits: torch.Tensor) -> torch.Tensor:
        """Whether each row's two best float32 logits (last position) are under the margin apart."""
        best = logits[:, -1].to(torch.float32).topk(2, dim=-1).values
        return (best[:, 0] - best[:, 1]) < self.margin

    def decide(self, logits: torch.Tensor, tokens: torch.Tensor, sequence_of: Callable[[int], list[int]],
               candidates: list[int], *, sampled: Sequence[int] = ()) -> torch.Tensor:
        """`tokens` with float64's pick for the `candidates` (batch positions still running) whose gap is under the
        margin, and for the `sampled` ones whatever their gap; `sequence_of(position)` is that row's ids so far."""
        near = self.near_ties(logits).tolist()
        decided = sorted({position for position in candidates if near[position]} | set(sampled))
        if not decided:
            return tokens
        ids, mask = left_pad([sequence_of(position) for position in decided], pad_token_id=0)  # 0: masked
        reference_logits = forward_last(self.reference, ids.to(tokens.device), mask.to(tokens.device)).logits
        self._check_error(reference_logits[:, -1], logits[decided, -1])
        tokens = tokens.clone()
        tokens[decided] = greedy_tokens(reference_logits)
        self.decisions += len(decided)
        return tokens

    def _check_error(self, reference: torch.Tensor, proposed: torch.Tensor) -> None:
        error = float((reference.to(torch.float64) - proposed.to(torch.float64)).abs().max())
        self.error_max = max(self.error_max, error)
        if error > ERROR_SHARE * self.margin:
            raise Float32TooCoarse(f"float32 logits differ from float64's by {error:.3g} on this machine, over "
                                   f"{ERROR_SHARE} of the {self.margin} margin")

    def stats(self) -> dict[str, Any]:
        """For metrics/timing: what float64 decided here (it depends on the CPU's float32 rounding)."""
        return {"near_tie_float64_decisions": self.decisions,
                "near_tie_float32_error_max": float(f"{self.error_max:.3g}"),
                "near_tie_float32_dropped": self.dropped}
