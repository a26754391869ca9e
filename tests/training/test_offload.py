"""Activation checkpointing with the saved activations offloaded to the host."""
from __future__ import annotations

import torch

from alpaca_qlora.training.offload import OffloadedCheckpoint
from alpaca_qlora.training.trainer import run_training
from support.params import embedded_params
from support.training import GradientsAtStep, assert_same_gradients, make_job


def test_checkpointing_with_host_offload_gives_the_same_gradient(tiny_mistral_dir, tokenized, tmp_path):
    # LoRA dropout is on: the recomputation must replay the forward's dropout masks exactly.
    lora = embedded_params(lora={"r": 8, "alpha": 16, "dropout": 0.2}).lora
    gradients = []
    for checkpointing, offload in ((False, False), (True, False), (True, True)):
        capture = GradientsAtStep()
        job = make_job(tiny_mistral_dir, tokenized, tmp_path / f"{checkpointing}{offload}", max_steps=1,
                       micro_batch_size=4, gradient_checkpointing=checkpointing, checkpoint_offload=offload,
                       max_grad_norm=0.0, lora=lora, callbacks=[capture])
        calls = []
        original = OffloadedCheckpoint.forward
        OffloadedCheckpoint.forward = staticmethod(
            lambda *a, calls=calls, original=original: calls.append(1) or original(*a))
        try:
            run_training(job, resume=False)
        finally:
            OffloadedCheckpoint.forward = staticmethod(original)
        assert bool(calls) == offload
        gradients.append(capture.gradients)
    assert_same_gradients(gradients)


def test_offload_keeps_nothing_for_a_forward_without_backward():
    """A checkpointed layer run with gradients off (train mode under no_grad) has no backward to wait for: nothing
    goes to the host and nothing stays pending."""
    from alpaca_qlora.training.offload import OffloadSchedule, offloaded_checkpoint

    layer = torch.nn.Linear(4, 4)
    hidden = torch.randn(2, 4, requires_grad=True)
    schedule = OffloadSchedule()
    with torch.no_grad():
        out = offloaded_checkpoint(layer, hidden, schedule=schedule, layer_order=0)
    assert torch.equal(out, layer(hidden).detach()) and schedule.pending == []
    out = offloaded_checkpoint(layer, hidden, schedule=schedule, layer_order=0)
    assert len(schedule.pending) == 1
    out.sum().backward()
    assert schedule.pending == [] and torch.allclose(hidden.grad, layer.weight.sum(0).expand(2, 4))
