"""A LoRA rank is checked against the layers it adapts before any adapter weight is allocated."""
from __future__ import annotations

import logging

import pytest
import torch

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.training.model import attach_lora, validate_lora_rank
from support.params import embedded_params

TARGETS = ["q_proj", "k_proj", "v_proj"]


class Block(torch.nn.Module):
    """Attention-shaped projections: q 64 -> 64, k and v 64 -> 16 (grouped keys and values)."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(64, 64, bias=False)
        self.k_proj = torch.nn.Linear(64, 16, bias=False)
        self.v_proj = torch.nn.Linear(64, 16, bias=False)
        self.embed = torch.nn.Embedding(100, 64)


def lora(r: int):
    return embedded_params(lora={"r": r, "alpha": r, "target_modules": TARGETS}).lora


def attach(r: int):
    return attach_lora(Block(), lora(r), quantized=False, gradient_checkpointing=False)


@pytest.mark.parametrize("r", [100000, 17])
def test_a_rank_above_the_smallest_adapted_layer_is_refused(r):
    with pytest.raises(PipelineError, match=rf"lora\.r = {r} .*k_proj.* 64 x 16.* at most 16"):
        attach(r)


def test_an_adapter_that_is_a_large_share_of_the_model_warns(caplog):
    with caplog.at_level(logging.WARNING):
        validate_lora_rank(Block(), lora(8))  # 8 x (128 + 80 + 80) = 2,304 of the model's 12,544 params: 18%
    assert "lora.r" not in caplog.text
    with caplog.at_level(logging.WARNING):
        validate_lora_rank(Block(), lora(15))  # 4,320 adapter params: 34% of the model
    assert "lora.r = 15" in caplog.text and "% of" in caplog.text
