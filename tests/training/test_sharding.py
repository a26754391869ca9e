"""FSDP's sharding: the output projection is left whole only where that is sound. (FSDP2 training itself,
on two gloo processes, is in tests/training/test_distributed.py.)"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.training.sharding import keep_output_projection_whole
from support.params import embedded_params


def test_fsdp_leaves_the_output_projection_whole_only_where_that_is_sound(tiny_mistral_dir):
    """The projection joins the plugin's ignored modules in the compute dtype; a trained one (FSDP would never
    reduce its gradients) or a pattern set outside the stage is refused."""
    from types import SimpleNamespace

    from alpaca_qlora.models.loading import load_model
    from alpaca_qlora.models.quantization import plan_quantization
    from alpaca_qlora.training.model import attach_lora

    def model(targets: tuple[str, ...]) -> torch.nn.Module:
        lora = dataclasses.replace(embedded_params().lora, target_modules=list(targets))
        return attach_lora(load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu"), lora,
                           quantized=False, gradient_checkpointing=False)

    plain = model(("q_proj",))
    other = torch.nn.Linear(2, 2)
    plugin = SimpleNamespace(ignored_modules=[other])
    keep_output_projection_whole(plugin, plain, torch.bfloat16)
    assert plugin.ignored_modules == [other, plain.get_output_embeddings()]
    assert plain.get_output_embeddings().weight.dtype == torch.bfloat16
    with pytest.raises(PipelineError, match="lm_head from lora.target_modules"):
        keep_output_projection_whole(SimpleNamespace(ignored_modules=None), model(("q_proj", "lm_head")), None)
    with pytest.raises(PipelineError, match="FSDP_IGNORED_MODULES"):
        keep_output_projection_whole(SimpleNamespace(ignored_modules="lm_head"), plain, None)
