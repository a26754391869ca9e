"""Activation checkpoints kept in pinned host memory: GPU memory for checkpointed activations becomes host memory.

On CUDA the copies run on a stream of their own, so they overlap the layers' compute: each layer's input goes to
the host while the next layers run forward (which holds because a decoder layer never writes its input in place),
and in backward the input of the layer below is fetched back while the current layer recomputes (one layer's input
in flight, double-buffered). On CPU the copies are plain copies.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from alpaca_qlora.errors import PipelineError


class OffloadSchedule:
    """The checkpoints of one forward pass in layer order, and the copy stream they travel on.

    Backward visits the layers in reverse, so the checkpoint below the one being recomputed is the next one needed:
    `fetch` starts its copy back to the GPU before the current layer's recomputation is queued."""

    def __init__(self) -> None:
        self.pending: list[Any] = []  # ctx of every layer whose backward has not run yet, in forward order
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def to_host(self, ctx: Any, hidden_states: torch.Tensor) -> None:
        """Start the copy of a layer's input to pinned host memory, after the compute that produced it."""
        device = hidden_states.device
        host = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, device="cpu",
                           pin_memory=device.type == "cuda")
        stream = self.stream(device)
        if stream is None:
            host.copy_(hidden_states.detach())
        else:
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                host.copy_(hidden_states.detach(), non_blocking=True)
            hidden_states.record_stream(stream)  # its memory is not reused before the copy has read it
        ctx.host, ctx.on_device, ctx.ready = host, None, None
        if self.pending and self.pending[-1].layer_order >= ctx.layer_order:
            self.pending.clear()  # a new forward pass (the last one had no backward, e.g. an exception)
        self.pending.append(ctx)

    def fetch(self, ctx: Any) -> None:
        """Start the copy of a checkpoint back to the device (once), on the copy stream."""
        if ctx.on_device is not None:
            return
        stream = self.stream(ctx.device)
        if stream is None:
            ctx.on_device = ctx.host.to(ctx.device)
            return
        with torch.cuda.stream(stream):
            ctx.on_device = ctx.host.to(ctx.device, non_blocking=True)
            ctx.ready = torch.cuda.Event()
            ctx.ready.record(stream)

    def take(self, ctx: Any) -> torch.Tensor:
        """This layer's input back on the device, and the next layer down's copy started."""
        if self.pending and self.pending[-1] is ctx:
            self.pending.pop()
        self.fetch(ctx)
        if self.pending:
            self.fetch(self.pending[-1])
        hidden_states = ctx.on_device
        if ctx.ready is not None:
            torch.cuda.current_stream(ctx.device).wait_event(ctx.ready)
            hidden_states.record_stream(torch.cuda.current_stream(ctx.device))
        ctx.host = ctx.on_device = ctx.ready = None
        return hidden_states


class OffloadedCheckpoint(torch.autograd.Function):
    """Activation checkpointing whose saved layer input waits in pinned host memory instead of on the GPU.

    Forward runs the layer without keeping its graph and sends the layer's input to the host; backward takes it
    back, recomputes the layer with the same RNG state and autocast settings (so LoRA dropout masks match), and
    backpropagates through the recomputation. The GPU keeps no per-layer activation between forward and backward.
    """

    @staticmethod
    def forward(ctx: Any, schedule: OffloadSchedule, layer_order: int, run: Any, hidden_states: torch.Tensor,
                *args: Any) -> Any:
        device = hidden_states.device
        ctx.schedule, ctx.layer_order, ctx.run, ctx.args, ctx.device = schedule, layer_order, run, args, device
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        schedule.to_host(ctx, hidden_states)
        with torch.no_grad():
            return run(hidden_states, *args)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        hidden_states = ctx.schedule.take(ctx).detach().requires_grad_(True)
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
        return (None, None, None, hidden_states.grad, *([None] * len(ctx.args)))


def offloaded_checkpoint(run: Any, hidden_states: torch.Tensor, *args: Any, schedule: OffloadSchedule,
                         layer_order: int) -> Any:
    if not torch.is_grad_enabled():  # no backward will ask for the checkpoint: nothing to keep
        return run(hidden_states, *args)
    return OffloadedCheckpoint.apply(schedule, layer_order, run, hidden_states, *args)


def enable_checkpoint_offload(model: torch.nn.Module) -> int:
    """Swap the checkpoint function of every checkpointed decoder layer for the host-offloading one, all layers
    sharing one schedule (the order in which backward will want their checkpoints back)."""
    schedule = OffloadSchedule()
    layers = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            if type(module).__name__.endswith(("DecoderLayer", "Block")):
                module._gradient_checkpointing_func = functools.partial(offloaded_checkpoint, schedule=schedule,
                                                                        layer_order=layers)
                layers += 1
    if layers == 0:
        raise PipelineError("train.checkpoint_offload=true found no checkpointed decoder layer in this model.")
    return layers
