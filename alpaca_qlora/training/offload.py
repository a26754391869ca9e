"""Activation checkpoints kept in pinned host memory: GPU memory for checkpointed activations becomes host memory."""
from __future__ import annotations

from typing import Any

import torch

from alpaca_qlora.errors import PipelineError

class OffloadedCheckpoint(torch.autograd.Function):
    """Activation checkpointing whose saved layer input waits in pinned host memory instead of on the GPU.

    Forward runs the layer without keeping its graph and copies the layer's input to the host; backward copies it
    back, recomputes the layer with the same RNG state and autocast settings (so LoRA dropout masks match), and
    backpropagates through the recomputation. The GPU keeps no per-layer activation between forward and backward.
    """

    @staticmethod
    def forward(ctx: Any, run: Any, hidden_states: torch.Tensor, *args: Any) -> Any:
        device = hidden_states.device
        ctx.run, ctx.args, ctx.device = run, args, device
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        host = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, device="cpu",
                           pin_memory=device.type == "cuda")
        host.copy_(hidden_states.detach(), non_blocking=True)
        ctx.host = host
        with torch.no_grad():
            return run(hidden_states, *args)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        hidden_states = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.host = None
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.device_rng is not None:
                torch.cuda.set_rng_state(ctx.device_rng, ctx.device)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                outputs = ctx.run(hidden_states, *ctx.args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, grad) for out, grad in zip(outputs, grad_outputs)
                 if isinstance(out, torch.Tensor) and out.requires_grad and grad is not None]
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        return (None, hidden_states.grad, *([None] * len(ctx.args)))


def offloaded_checkpoint(run: Any, hidden_states: torch.Tensor, *args: Any) -> Any:
    return OffloadedCheckpoint.apply(run, hidden_states, *args)


def enable_checkpoint_offload(model: torch.nn.Module) -> int:
    """Swap the checkpoint function of every checkpointed decoder layer for the host-offloading one."""
    layers = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            if type(module).__name__.endswith(("DecoderLayer", "Block")):
                module._gradient_checkpointing_func = offloaded_checkpoint
                layers += 1
    if layers == 0:
        raise PipelineError("train.checkpoint_offload=true found no checkpointed decoder layer in this model.")
    return layers
