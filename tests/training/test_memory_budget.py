"""The memory budget: the plan keeps the layers that fit, checkpoints the first ones, refuses a budget nothing fits
in, and the stage only plans where there is device memory to plan (the measured peaks: bench/budget_bench.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from alpaca_qlora.config import load_params
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.quantization import QuantizationPlan, plan_quantization, probe_4bit
from alpaca_qlora.training.frozen_weights import KEPT_ABSMAX, KEPT_WEIGHT, absmax_bytes, dequantized_bytes
from alpaca_qlora.training.fused_lora import fused_4bit_bases
from alpaca_qlora.training.memory_budget import (
    ACTIVATION_HEADROOM,
    GIB,
    StepPeaks,
    apply_plan,
    decoder_layers,
    memory_budget,
    plan_frozen_forms,
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


MIB = 2**20
# 8 layers; a step with every layer checkpointed peaks at 1 GiB + 100 bytes a token above the weights, with every
# layer kept at 1 GiB + 900 bytes a token: 100 bytes a token for each kept layer
PEAKS = StepPeaks(layers=8, checkpointed_base=GIB, checkpointed_per_token=100.0, kept_base=GIB, kept_per_token=900.0)


def test_the_step_peaks_give_each_kept_layer_its_share_of_the_difference():
    assert PEAKS.checkpointed(MIB) == GIB + 100 * MIB
    assert PEAKS.per_kept_layer(MIB) == pytest.approx(100 * MIB)


def test_a_roomy_budget_keeps_every_layer_and_a_tight_one_checkpoints_the_first_layers():
    roomy = plan_layers(PEAKS, budget_gib=100, fixed_bytes=GIB, tokens=MIB)
    assert roomy.kept_layers == 8 and roomy.checkpointed_layers == ()
    tight = plan_layers(PEAKS, budget_gib=2.8, fixed_bytes=GIB, tokens=MIB)
    assert 0 < tight.kept_layers < 8
    assert tight.checkpointed_layers == tuple(range(8 - tight.kept_layers))
    assert tight.expected_peak_gib <= 2.8
    # the most layers the budget holds: just under the plan's own peak, one layer fewer fits
    fewer = plan_layers(PEAKS, budget_gib=tight.expected_peak_gib - 0.01, fixed_bytes=GIB, tokens=MIB)
    assert fewer.kept_layers == tight.kept_layers - 1


def test_more_tokens_a_micro_batch_keep_fewer_layers_under_the_same_budget():
    one, four = (plan_layers(PEAKS, budget_gib=4, fixed_bytes=GIB, tokens=count * MIB) for count in (1, 4))
    assert four.kept_layers < one.kept_layers


def test_the_room_left_after_the_activations_goes_to_dequantized_layers_that_fit():
    plan = plan_layers(PEAKS, budget_gib=100, fixed_bytes=GIB, tokens=MIB)  # every layer kept, most of 100 GiB free
    room = plan.budget_gib - plan.expected_peak_gib
    roomy = plan_frozen_forms(plan, layers=8, dequantized_bytes=GIB, absmax_bytes=0)
    assert roomy.dequantized_layers == 8 and roomy.expected_peak_gib == pytest.approx(plan.expected_peak_gib + 8)
    some = plan_frozen_forms(plan, layers=8, dequantized_bytes=int(room / 3.5 * GIB), absmax_bytes=0)
    assert some.dequantized_layers == 3 and some.expected_peak_gib <= some.budget_gib
    too_big = int((room + 0.1) * GIB)
    assert plan_frozen_forms(plan, layers=8, dequantized_bytes=too_big, absmax_bytes=0).dequantized_layers == 0
    nothing = plan_frozen_forms(plan, layers=8, dequantized_bytes=0, absmax_bytes=0)  # nothing fused to keep
    assert nothing.dequantized_layers == nothing.absmax_layers == 0


def test_block_scales_take_the_room_first_and_a_dequantized_copy_replaces_its_layers_scales():
    plan = plan_layers(PEAKS, budget_gib=100, fixed_bytes=GIB, tokens=MIB)
    room = (plan.budget_gib - plan.expected_peak_gib) * GIB
    # room for the scales of 5 layers of 8: no copy, and the first layers get them
    partial = plan_frozen_forms(plan, layers=8, dequantized_bytes=GIB, absmax_bytes=int(room / 5.5))
    assert (partial.dequantized_layers, partial.absmax_layers) == (0, 5)
    assert partial.expected_peak_gib <= partial.budget_gib
    # every layer's scales, then copies for what is left, each freeing its layer's scales
    scales = 10 * MIB
    left = room - 8 * scales
    both = plan_frozen_forms(plan, layers=8, dequantized_bytes=int(left / 3.5) + scales, absmax_bytes=scales)
    assert (both.dequantized_layers, both.absmax_layers) == (3, 5)
    expected = plan.expected_peak_gib + (5 * scales + 3 * (int(left / 3.5) + scales)) / GIB
    assert both.expected_peak_gib == pytest.approx(expected, abs=0.01) and both.expected_peak_gib <= both.budget_gib
    everything = plan_frozen_forms(plan, layers=8, dequantized_bytes=GIB, absmax_bytes=scales)
    assert (everything.dequantized_layers, everything.absmax_layers) == (8, 0)
    assert everything.expected_peak_gib == pytest.approx(plan.expected_peak_gib + 8, abs=0.01)  # no scales counted
    assert everything.record()["memory_plan_absmax_layers"] == 0


def test_a_budget_nothing_fits_in_is_refused_with_what_to_change():
    with pytest.raises(PipelineError, match="micro_batch_size.*max_seq_length"):
        plan_layers(PEAKS, budget_gib=2.0, fixed_bytes=GIB, tokens=MIB)


def test_applying_a_plan_checkpoints_exactly_its_layers(tiny_model):
    layers = decoder_layers(tiny_model)
    peaks = StepPeaks(layers=len(layers), checkpointed_base=0, checkpointed_per_token=1.0, kept_base=0,
                      kept_per_token=1.0 + len(layers))  # a kept layer: 1 byte a token
    room_for_one = 1000 * (1 + 1.0) * ACTIVATION_HEADROOM / GIB  # all checkpointed, plus one kept layer
    plan = plan_layers(peaks, budget_gib=room_for_one + 1e-9, fixed_bytes=0, tokens=1000)
    try:
        apply_plan(tiny_model, plan, torch.float32)
        assert plan.kept_layers == 1 and not layers[-1].gradient_checkpointing
        assert [layer.gradient_checkpointing for layer in layers] == [
            index in plan.checkpointed_layers for index in range(len(layers))]
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


@pytest.mark.skipif(not probe_4bit("cpu")[0], reason="bitsandbytes 4-bit unavailable on this CPU")
def test_applying_a_plan_keeps_its_first_layers_weights_dequantized_and_drops_the_rest(tiny_mistral_dir):
    lora = embedded_params(lora={"dropout": 0.0}).lora
    model = build_trainable_model(str(tiny_mistral_dir), QuantizationPlan(True, "test", torch.float32), lora,
                                  SpeedSwitches(liger_kernels=False, gradient_checkpointing=True, fused_lora=True),
                                  device="cpu")
    layers = decoder_layers(model)
    peaks = StepPeaks(layers=len(layers), checkpointed_base=0, checkpointed_per_token=1.0, kept_base=0,
                      kept_per_token=1.0)
    plan = plan_layers(peaks, budget_gib=1.0, fixed_bytes=0, tokens=1000)
    bytes_per_layer = dequantized_bytes(fused_4bit_bases(layers[0]), torch.float32)
    assert bytes_per_layer > 0
    for count, scaled in ((1, 1), (len(layers), 0), (0, 1), (0, 0)):  # each replaces the last one's forms
        apply_plan(model, dataclasses.replace(plan, dequantized_layers=count, absmax_layers=scaled), torch.float32)
        for index, layer in enumerate(layers):
            bases = fused_4bit_bases(layer)
            assert [KEPT_WEIGHT in base.__dict__ for base in bases] == [index < count] * len(bases)
            assert [KEPT_ABSMAX in base.__dict__ for base in bases] == [count <= index < count + scaled] * len(bases)
    assert not any(KEPT_WEIGHT in module.__dict__ or KEPT_ABSMAX in module.__dict__ for module in model.modules())
    assert absmax_bytes(fused_4bit_bases(model)) > 0


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


def test_auto_plans_within_a_cap_already_set_and_the_budget_never_lifts_it(monkeypatch):
    """A bench capping the process as a smaller card (bench/capped_stage.py): the budget is that card's."""
    from types import SimpleNamespace

    fraction = {"value": 0.25}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: fraction["value"])
    train = embedded_params().train
    capped = memory_budget(train, "cuda")
    assert capped.gib == pytest.approx(resolve_budget_gib("auto", 20 * GIB)) and capped.gib < 20
    with pytest.raises(PipelineError, match="more than this GPU has for this process"):
        memory_budget(embedded_params(train={"memory_budget_gib": 30}).train, "cuda")
    fraction["value"] = 1.0
    assert memory_budget(train, "cuda").gib == pytest.approx(resolve_budget_gib("auto", 80 * GIB))
