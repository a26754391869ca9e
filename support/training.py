"""A short training run on the tiny Mistral for tests/ (CPU, seconds): its rows, the job, and callbacks that
capture gradients or interrupt the run."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

from alpaca_qlora.config import LoraParams
from alpaca_qlora.data.formatting import tokenize_training_rows
from alpaca_qlora.data.prompts import ALPACA
from alpaca_qlora.models.loading import load_model, load_tokenizer
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.training.data import TokenizedDataset
from alpaca_qlora.training.model import attach_lora
from alpaca_qlora.training.trainer import TrainingJob
from support.params import embedded_params

ROWS = [
    {"id": "a", "instruction": "What is the chemical symbol of sodium?", "input": "", "output": "Na"},
    {"id": "b", "instruction": "Classify the number as even or odd.", "input": "7", "output": "odd"},
    {"id": "c", "instruction": "Describe neon.",
     "input": "", "output": "Neon is a noble gas with atomic number 10. It glows orange-red in discharge tubes."},
    {"id": "d", "instruction": "Name the capital city given in the text.",
     "input": "Lisbon is the capital of Portugal.", "output": "Lisbon"},
]


def tokenized_rows(model_dir: Path) -> list[dict]:
    """ROWS as the format stage writes them for the model in `model_dir`."""
    examples, _ = tokenize_training_rows(ROWS, load_tokenizer(str(model_dir)), ALPACA, max_length=256,
                                         overlong="truncate")
    return examples


def make_job(model_dir: Path, rows, tmp_path: Path, *, quantization: str = "none", lora: LoraParams | None = None,
             callbacks=(), **train_overrides) -> TrainingJob:
    settings = dict(micro_batch_size=2, gradient_accumulation_steps=1, max_steps=2, logging_steps=1,
                    save_steps=1000, gradient_checkpointing=False, learning_rate=1e-3, warmup_ratio=0.0,
                    lr_scheduler="constant", packing=False)
    train = embedded_params(train={**settings, **train_overrides}).train
    lora = lora or embedded_params(lora={"r": 8, "alpha": 16, "dropout": 0.0}).lora
    plan = plan_quantization(quantization, "cpu")
    tokenizer = load_tokenizer(str(model_dir))
    set_seed(train.seed)
    model = attach_lora(load_model(str(model_dir), plan, device="cpu"), lora, quantized=plan.quantized,
                        gradient_checkpointing=train.gradient_checkpointing, frozen_dtype=train.frozen_dtype,
                        checkpoint_offload=train.checkpoint_offload)
    return TrainingJob(model=model, tokenizer=tokenizer, dataset=TokenizedDataset(rows), train=train, plan=plan,
                       device="cpu", run_dir=tmp_path / "run", log_dir=tmp_path / "log",
                       extra_callbacks=tuple(callbacks))


class GradientsAtStep(TrainerCallback):
    def __init__(self):
        self.gradients: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.gradients:
            self.gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters()
                              if p.requires_grad and p.grad is not None}


def assert_same_gradients(gradients: list[dict[str, torch.Tensor]]) -> None:
    assert gradients[0]
    for other in gradients[1:]:
        assert other.keys() == gradients[0].keys()
        for name, gradient in gradients[0].items():
            torch.testing.assert_close(other[name], gradient, rtol=1e-4, atol=1e-6)


class Interrupt(TrainerCallback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt("simulated interruption")


def assert_packed_rows_apart(model: torch.nn.Module, rows: list[dict]) -> None:
    """One bin holding `rows` gives each row the logits it gets alone: no row attends across a boundary. Boundaries
    are read from the position resets only without a KV cache, as in training."""
    from alpaca_qlora.training.packing import PackedCollator

    packed = PackedCollator()([rows])
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                              use_cache=False).logits[0]
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(packed_logits[start : start + len(alone)], alone, rtol=1e-4, atol=1e-4)
            start += len(alone)


def assert_same_adapter(adapter: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """The same adapter weights, by name, to a training step's rounding."""
    assert adapter.keys() == reference.keys()
    for name, weight in reference.items():
        torch.testing.assert_close(adapter[name], weight, rtol=1e-4, atol=1e-5)
