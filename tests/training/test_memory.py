"""The memory budget: what each layer keeps is measured, the plan keeps the layers that fit, and the stage only
plans where there is device memory to plan."""
from __future__ import annotations

import pytest
import torch

from alpaca_qlora.config import load_params
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.training.memory import (
    GIB,
    LayerCosts,
    apply_plan,
    decoder_layers,
    measure_layer_costs,
    memory_budget,
    plan_layers,
    resolve_budget_gib,
)
from alpaca_qlora.training.model import SpeedSwitches, build_trainable_model
from support.params import embedded_params

LORA = embedded_params().lora


@pytest.fixture(scope="module")
def tiny_model(tiny_mistral_dir):
    torch.manual_seed(0)
    return build_trainable_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), LORA,
                                 SpeedSwitches(liger_kernels=False, gradient_checkpointing=True), device="cpu")


def _saved_bytes(model, tokens: int) -> int:
    """Bytes autograd keeps for backward in one forward pass as the model is set up now (weights excluded)."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    sizes: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 100, (1, tokens), generator=torch.Generator().manual_seed(1))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(sizes.values())


def test_each_layer_keeps_far_more_than_its_checkpoint_and_the_counts_grow_with_the_tokens(tiny_model):
    small, large = measure_layer_costs(tiny_model, tokens=32), measure_layer_costs(tiny_model, tokens=128)
    layers = len(decoder_layers(tiny_model))
    assert len(small.kept) == layers >= 2
    assert all(cost > 4 * small.checkpointed for cost in small.kept)
    for a, b in zip(small.kept, large.kept, strict=True):  # bytes per token: about the same at 4x the tokens
        assert b == pytest.approx(a, rel=0.25)
    assert all(layer.gradient_checkpointing for layer in decoder_layers(tiny_model))  # restored after the probe


def test_the_measured_costs_predict_what_a_plan_keeps(tiny_model):
    """Keeping the last layer and checkpointing the others saves about what the costs say, measured independently."""
    tokens = 96
    costs = measure_layer_costs(tiny_model, tokens=tokens)
    layers = decoder_layers(tiny_model)
    try:
        for layer in layers:
            layer.gradient_checkpointing = True
        all_checkpointed = _saved_bytes(tiny_model, tokens)
        layers[-1].gradient_checkpointing = False
        one_kept = _saved_bytes(tiny_model, tokens)
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True
    predicted = (costs.kept[-1] - costs.checkpointed) * tokens
    assert one_kept - all_checkpointed == pytest.approx(predicted, rel=0.2)
    assert all_checkpointed == pytest.approx(
        (len(layers) * costs.checkpointed + costs.outside_layers) * tokens, rel=0.35)


COSTS = LayerCosts(kept=(1000.0,) * 8, checkpointed=100.0, outside_layers=50.0)  # bytes per token


def test_a_roomy_budget_keeps_every_layer_and_a_tight_one_checkpoints_the_first_layers():
    tokens = 2**20  # 1 MiB a byte-per-token
    roomy = plan_layers(COSTS, budget_gib=100, fixed_bytes=GIB, tokens=tokens, offloaded_checkpoints=False)
    assert roomy.kept_layers == 8 and roomy.checkpointed_layers == ()
    tight = plan_layers(COSTS, budget_gib=6, fixed_bytes=GIB, tokens=tokens, offloaded_checkpoints=False)
    assert 0 < tight.kept_layers < 8
    assert tight.checkpointed_layers == tuple(range(8 - tight.kept_layers))
    assert tight.expected_peak_gib <= 6
    # the most layers the budget holds: just under the plan's own peak, one layer fewer fits
    fewer = plan_layers(COSTS, budget_gib=tight.expected_peak_gib - 0.01, fixed_bytes=GIB, tokens=tokens,
                        offloaded_checkpoints=False)
    assert fewer.kept_layers == tight.kept_layers - 1


def test_offloaded_checkpoints_leave_room_for_more_kept_layers():
    tokens = 2**20
    on_gpu = plan_layers(COSTS, budget_gib=5, fixed_bytes=GIB, tokens=tokens, offloaded_checkpoints=False)
    offloaded = plan_layers(COSTS, budget_gib=5, fixed_bytes=GIB, tokens=tokens, offloaded_checkpoints=True)
    assert offloaded.kept_layers >= on_gpu.kept_layers
    assert offloaded.expected_peak_gib < on_gpu.expected_peak_gib or offloaded.kept_layers > on_gpu.kept_layers


def test_a_budget_nothing_fits_in_is_refused_with_what_to_change():
    with pytest.raises(PipelineError, match="micro_batch_size.*max_seq_length"):
        plan_layers(COSTS, budget_gib=1.2, fixed_bytes=GIB, tokens=2**20, offloaded_checkpoints=False)


def test_applying_a_plan_checkpoints_exactly_its_layers(tiny_model):
    layers = decoder_layers(tiny_model)
    kept = 1000 * 1.15  # bytes a kept layer takes at 1000 tokens, with the plan's headroom
    room_for_one = ((len(layers) - 1) * 100 + 2 * kept + 10) / GIB  # one kept, the rest checkpointed, gradients
    plan = plan_layers(LayerCosts(kept=(1.0,) * len(layers), checkpointed=0.1, outside_layers=0.0),
                       budget_gib=room_for_one, fixed_bytes=0, tokens=1000, offloaded_checkpoints=False)
    try:
        apply_plan(tiny_model, plan)
        assert [layer.gradient_checkpointing for layer in layers] == [
            index in plan.checkpointed_layers for index in range(len(layers))]
        assert plan.kept_layers == 1 and not layers[-1].gradient_checkpointing
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


def test_auto_leaves_a_margin_and_an_explicit_budget_above_the_card_is_refused():
    assert resolve_budget_gib("auto", 24 * GIB) == pytest.approx(24 - 1.2)
    assert resolve_budget_gib("auto", 12 * GIB) == pytest.approx(11.0)
    assert resolve_budget_gib(10, 24 * GIB) == 10
    with pytest.raises(PipelineError, match="more than this GPU has"):
        resolve_budget_gib(30, 24 * GIB)


def test_the_budget_plans_nothing_on_cpu_and_the_param_is_validated():
    assert memory_budget(embedded_params().train, "cpu") is None
    assert embedded_params(train={"memory_budget_gib": "20"}).train.memory_budget_gib == 20.0
    for bad in (0, -1, "nan", "inf", "lots"):
        with pytest.raises(PipelineError, match="memory_budget_gib"):
            embedded_params(train={"memory_budget_gib": bad})
    assert load_params().train.memory_budget_gib == "auto"
