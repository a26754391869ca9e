"""What a training step asks of the host, measured on the CPU: operator calls and wall time per step of the train
stage's fused QLoRA model at Mistral-7B's depth and tiny widths.

At small micro-batches a GPU step is bound by the host: every operator is a kernel launch with Python and dispatcher
work around it, and the GPU waits (bench/results/train_profile_h200_host_rows1.json). At tiny widths the CPU's own
arithmetic is small, so a CPU step shows that work without a GPU: the operators a step dispatches (each a launch on
the GPU; views and allocations left out) and its wall time. Each variant is a form the memory plan keeps the frozen
weights in (training/frozen_weights.py), measured in one run against `nf4` (dequantized at every call):

    python -m bench.host_overhead --out bench/results/host_overhead_cpu.json

The GPU's launches per step differ in what the CPU runs instead of Liger's kernels and in autocast's casts; the
differences between variants are the same code.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alpaca_qlora.models.quantization import QuantizationPlan
from alpaca_qlora.stage import configure_logging
from alpaca_qlora.training.memory_budget import decoder_layers
from alpaca_qlora.training.model import SpeedSwitches, build_trainable_model
from bench import command_line
from bench.train_variants import keep_frozen_forms, profile_lora
from support.mistral import build_tiny_mistral

# no kernel of their own on a GPU: views, metadata and allocations
NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "reshape", "expand", "unsqueeze", "squeeze", "slice", "select",
             "permute", "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind", "_reshape_alias",
             "empty", "empty_like", "empty_strided", "lift_fresh", "_local_scalar_dense"}
# name: (every layer's weights kept dequantized, every layer's block scales kept in fp32)
VARIANTS = {"nf4": (False, False), "nf4_kept_scales": (False, True), "dequantized": (True, False)}


class OperatorCount(TorchDispatchMode):
    """Operators reaching a device kernel, by name (bitsandbytes' ops among them)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name.rstrip("_") not in NO_KERNEL:
            self.calls[f"{func.namespace}::{name}"] += 1
        return func(*args, **(kwargs or {}))


def training_step(model: Any, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@dataclasses.dataclass
class Run:
    """One variant's model, optimizer and figures, stepped in turn with the others."""

    variant: str
    model: Any
    optimizer: torch.optim.Optimizer
    losses: list[float] = dataclasses.field(default_factory=list)
    walls_ms: list[float] = dataclasses.field(default_factory=list)

    def steps(self, ids: torch.Tensor, count: int) -> float:
        """`count` steps; ms a step."""
        started = time.perf_counter()
        self.losses += [training_step(self.model, self.optimizer, ids) for _ in range(count)]
        return (time.perf_counter() - started) / count * 1e3


def prepare(model: Any, variant: str) -> Run:
    """The frozen weights in the variant's form; every layer keeps its activations (the model is built without
    checkpointing), as at 24 GiB with 2 x 2048 tokens."""
    dequantized, scales = VARIANTS[variant]
    keep_frozen_forms(model, dequantized=dequantized, scales=scales, dtype=torch.float32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    return Run(variant, model, optimizer)


def measure(runs: list[Run], *, tokens: int, steps: int, warmup: int, repeats: int) -> list[dict[str, Any]]:
    """Each repeat steps every variant in turn, so drift in the machine's load reaches them all alike; each
    variant's time is its fastest repeat. The operators of one more step are counted last."""
    ids = torch.randint(0, runs[0].model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    for run in runs:
        run.steps(ids, warmup)
    for _ in range(repeats):
        for run in runs:
            run.walls_ms.append(run.steps(ids, steps))
    results = []
    for run in runs:
        count = OperatorCount()
        with count:
            run.steps(ids, 1)
        bitsandbytes = {name: calls for name, calls in count.calls.items() if name.startswith("bitsandbytes::")}
        layers = len(decoder_layers(run.model))
        dequantized, scales = VARIANTS[run.variant]
        results.append({"variant": run.variant, "dequantized_layers": layers if dequantized else 0,
                        "absmax_layers": layers if scales else 0, "operators_per_step": sum(count.calls.values()),
                        "bitsandbytes_ops_per_step": bitsandbytes, "wall_ms_per_step": round(min(run.walls_ms), 2),
                        "wall_ms_per_repeat": [round(wall, 2) for wall in run.walls_ms],
                        "losses": [round(loss, 6) for loss in run.losses]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)  # few: the CPU's arithmetic stays small beside the host work
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    arguments = parser.parse_args()
    configure_logging()
    torch.set_num_threads(arguments.threads)
    lora = dataclasses.replace(profile_lora(), dropout=0.0)
    with tempfile.TemporaryDirectory() as folder:
        source = build_tiny_mistral(Path(folder), num_hidden_layers=arguments.layers, hidden_size=64,
                                    intermediate_size=224, num_attention_heads=8, num_key_value_heads=2)
        runs = []
        for variant in VARIANTS:
            torch.manual_seed(0)
            model = build_trainable_model(str(source), QuantizationPlan(True, "bench", torch.float32), lora,
                                          SpeedSwitches(liger_kernels=False, gradient_checkpointing=False,
                                                        fused_lora=True), device="cpu")
            model.config.use_cache = False
            runs.append(prepare(model, variant))
    results = measure(runs, tokens=arguments.tokens, steps=arguments.steps, warmup=arguments.warmup,
                      repeats=arguments.repeats)
    baseline = results[0]
    for result in results:
        result["same_losses_as_nf4"] = result["losses"] == baseline["losses"]
        result["operators_vs_nf4"] = round(result["operators_per_step"] / baseline["operators_per_step"], 3)
        result["wall_vs_nf4"] = round(result["wall_ms_per_step"] / baseline["wall_ms_per_step"], 3)
    arguments.out.write_text(json.dumps({"command": command_line(), "torch": torch.__version__,
                                         "threads": arguments.threads, "layers": arguments.layers,
                                         "tokens_per_step": arguments.tokens, "results": results}, indent=1) + "\n")
    print(f"{'variant':<18}{'operators/step':>16}{'bnb ops/step':>14}{'ms/step':>10}{'ops ratio':>11}"
          f"{'wall ratio':>12}{'same losses':>13}")
    for result in results:
        print(f"{result['variant']:<18}{result['operators_per_step']:>16}"
              f"{sum(result['bitsandbytes_ops_per_step'].values()):>14}{result['wall_ms_per_step']:>10}"
              f"{result['operators_vs_nf4']:>11}{result['wall_vs_nf4']:>12}{result['same_losses_as_nf4']!s:>13}")


if __name__ == "__main__":
    main()
