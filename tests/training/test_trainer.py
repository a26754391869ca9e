"""Training behaviour on a tiny random Mistral with the real Mistral tokenizer (CPU, seconds)."""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, set_seed

from alpaca_qlora.adapter import save_adapter
from alpaca_qlora.config import LoraParams
from alpaca_qlora.data.formatting import IGNORE_INDEX, tokenize_training_rows
from alpaca_qlora.data.prompts import ALPACA
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.inference import load_for_inference
from alpaca_qlora.models.loading import load_model, load_tokenizer
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.training.checkpoints import checkpoint_problem
from alpaca_qlora.training.data import ResponseOnlyCollator, TokenizedDataset
from alpaca_qlora.training.model import (
    SpeedSwitches,
    apply_liger_kernels,
    attach_lora,
    prepare_quantized_model,
    resolve_speed_switches,
)
from alpaca_qlora.training.offload import OffloadedCheckpoint
from alpaca_qlora.training.packing import PackedCollator, PackedDataset, best_fit_decreasing, sequence_boundaries
from alpaca_qlora.training.trainer import TrainingJob, run_training
from support.params import embedded_params

ROWS = [
    {"id": "a", "instruction": "What is the chemical symbol of sodium?", "input": "", "output": "Na"},
    {"id": "b", "instruction": "Classify the number as even or odd.", "input": "7", "output": "odd"},
    {"id": "c", "instruction": "Describe neon.",
     "input": "", "output": "Neon is a noble gas with atomic number 10. It glows orange-red in discharge tubes."},
    {"id": "d", "instruction": "Name the capital city given in the text.",
     "input": "Lisbon is the capital of Portugal.", "output": "Lisbon"},
]


@pytest.fixture(scope="module")
def tokenized(tiny_mistral_dir):
    tokenizer = load_tokenizer(str(tiny_mistral_dir))
    examples, _ = tokenize_training_rows(ROWS, tokenizer, ALPACA, max_length=256, overlong="truncate")
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


def test_two_steps_then_the_saved_adapter_reloads_with_the_same_logits(tiny_mistral_dir, tokenized, tmp_path):
    job = make_job(tiny_mistral_dir, tokenized, tmp_path)
    metrics = run_training(job, resume=False).metrics
    assert metrics["steps"] == 2 and metrics["quantized"] is False
    assert 0 < metrics["trainable_percent"] < 100
    assert metrics["trainable_params"] == sum(p.numel() for p in job.model.parameters() if p.requires_grad)
    assert metrics["total_params"] == sum(p.numel() for p in job.model.parameters())
    save_adapter(job.model, job.tokenizer, tmp_path / "adapter", "card", model_name=str(tiny_mistral_dir),
                 template=ALPACA)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()}
    batch = ResponseOnlyCollator(job.tokenizer.pad_token_id)(tokenized[:2])
    job.model.eval()
    with torch.no_grad():
        trained_logits = job.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reloaded = load_for_inference(str(tiny_mistral_dir), "none", adapter_dir=tmp_path / "adapter", device="cpu")
    with torch.no_grad():
        reloaded_logits = reloaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert reloaded_logits.dtype == torch.float64  # CPU inference runs in float64 (alpaca_qlora/models/numerics.py)
    torch.testing.assert_close(reloaded_logits.float(), trained_logits, rtol=1e-4, atol=1e-4)


def test_four_bit_training_runs_on_cpu(tiny_mistral_dir, tokenized, tmp_path):
    plan = plan_quantization("auto", "cpu")
    if not plan.quantized:
        pytest.skip(f"bitsandbytes 4-bit unavailable on this CPU: {plan.reason}")
    metrics = run_training(make_job(tiny_mistral_dir, tokenized, tmp_path, quantization="auto"), resume=False).metrics
    assert metrics["quantized"] is True and metrics["steps"] == 2


def test_loss_falls_on_a_memorisable_set(tiny_mistral_dir, tokenized, tmp_path):
    # A tiny random model's frozen head maps any normalized hidden state to near-uniform logits, so the adapter
    # also covers lm_head here; on a real model the seven projections suffice.
    lora = embedded_params(lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": [
        "q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]}).lora
    job = make_job(tiny_mistral_dir, tokenized, tmp_path, max_steps=30, learning_rate=1e-2, micro_batch_size=4,
                   lora=lora)
    metrics = run_training(job, resume=False).metrics
    assert metrics["final_loss"] < 0.3 * metrics["first_loss"]


def test_the_labels_reaching_the_loss_are_the_format_stages(tiny_mistral_dir, tokenized, tmp_path):
    job = make_job(tiny_mistral_dir, tokenized, tmp_path, max_steps=2)
    seen: list[tuple[list[int], list[int]]] = []

    def capture(module, args, kwargs):
        for ids, labels, mask in zip(kwargs["input_ids"], kwargs["labels"], kwargs["attention_mask"]):
            length = int(mask.sum())
            seen.append((ids[:length].tolist(), labels[:length].tolist()))
            assert (labels[length:] == IGNORE_INDEX).all()

    job.model.get_base_model().register_forward_pre_hook(capture, with_kwargs=True)
    run_training(job, resume=False)
    stored = {tuple(row["input_ids"]): row["labels"] for row in tokenized}
    assert len(seen) == 4
    for ids, labels in seen:
        assert stored[tuple(ids)] == labels


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


def test_gradient_accumulation_gives_the_big_batch_gradient(tiny_mistral_dir, tokenized, tmp_path):
    # Rows have very different numbers of labelled tokens: averaging per micro-batch would weight them wrongly.
    gradients = []
    for micro, accumulation in ((4, 1), (1, 4), (2, 2)):
        capture = GradientsAtStep()
        job = make_job(tiny_mistral_dir, tokenized, tmp_path / f"{micro}x{accumulation}", max_steps=1,
                       micro_batch_size=micro, gradient_accumulation_steps=accumulation, max_grad_norm=0.0,
                       callbacks=[capture])
        run_training(job, resume=False)
        gradients.append(capture.gradients)
    assert_same_gradients(gradients)


class Interrupt(TrainerCallback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt("simulated interruption")


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tiny_mistral_dir, tokenized, tmp_path):
    first = make_job(tiny_mistral_dir, tokenized, tmp_path, max_steps=6, save_steps=2, callbacks=[Interrupt(5)])
    with pytest.raises(KeyboardInterrupt):
        run_training(first, resume=True)
    assert (tmp_path / "run" / "checkpoint-4").is_dir()
    second = make_job(tiny_mistral_dir, tokenized, tmp_path, max_steps=6, save_steps=2)
    metrics = run_training(second, resume=True).metrics
    assert metrics["resumed_from_step"] == 4
    assert metrics["steps"] == 6


def dvclive_curve(log_dir: Path, name: str) -> list[tuple[int, float]]:
    with (log_dir / "plots" / "metrics" / "train" / f"{name}.tsv").open(encoding="utf-8") as handle:
        return [(int(row["step"]), float(row[name])) for row in csv.DictReader(handle, delimiter="\t")]


def test_a_resumed_run_reports_the_uninterrupted_runs_metrics_and_curves(tiny_mistral_dir, tokenized, tmp_path):
    # Checkpoints at 3, 6 and 9 fall between the logs at even steps: the log window open at a checkpoint must not
    # be lost by the resume.
    settings = dict(max_steps=12, save_steps=3, logging_steps=2, dvclive=True)
    whole_job = make_job(tiny_mistral_dir, tokenized, tmp_path / "whole", **settings)
    whole = run_training(whole_job, resume=True).metrics
    interrupted = make_job(tiny_mistral_dir, tokenized, tmp_path / "parts", callbacks=[Interrupt(5)], **settings)
    with pytest.raises(KeyboardInterrupt):
        run_training(interrupted, resume=True)
    resumed_job = make_job(tiny_mistral_dir, tokenized, tmp_path / "parts", **settings)
    resumed = run_training(resumed_job, resume=True).metrics

    assert resumed["resumed_from_step"] == 3 and whole["resumed_from_step"] == 0
    for key in ("steps", "epochs", "tokens", "labelled_tokens", "padding_fraction", "first_loss"):
        assert resumed[key] == whole[key], key
    for key in ("train_loss", "final_loss"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-5), key
    for name in ("loss", "learning_rate", "grad_norm"):
        whole_curve, resumed_curve = (dvclive_curve(job.log_dir, name) for job in (whole_job, resumed_job))
        assert [step for step, _ in resumed_curve] == [step for step, _ in whole_curve], name
        assert [value for _, value in resumed_curve] == pytest.approx([value for _, value in whole_curve], rel=1e-5)
    assert [step for step, _ in dvclive_curve(whole_job.log_dir, "loss")] == [1, 2, 3, 4, 6, 8, 9, 10, 12]


def test_train_loss_is_the_mean_step_loss_whatever_the_logging_interval(tiny_mistral_dir, tokenized, tmp_path):
    every_step, every_third = (
        run_training(make_job(tiny_mistral_dir, tokenized, tmp_path / str(interval), max_steps=7, save_steps=100,
                              logging_steps=interval), resume=False).metrics
        for interval in (1, 3))
    assert every_third["train_loss"] == pytest.approx(every_step["train_loss"], rel=1e-6)


@pytest.fixture(scope="module")
def interrupted_run(tiny_mistral_dir, tokenized, tmp_path_factory) -> Path:
    """A run of 6 steps interrupted at step 5, leaving checkpoint-2 and checkpoint-4 (save_total_limit 2)."""
    path = tmp_path_factory.mktemp("interrupted")
    job = make_job(tiny_mistral_dir, tokenized, path, max_steps=6, save_steps=2, callbacks=[Interrupt(5)])
    with pytest.raises(KeyboardInterrupt):
        run_training(job, resume=True)
    assert sorted(p.name for p in (path / "run").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    return path / "run"


DAMAGE = {
    "truncated adapter": ("adapter_model.safetensors", lambda path: os.truncate(path, path.stat().st_size // 2)),
    "empty trainer state": ("trainer_state.json", lambda path: path.write_text("")),
    "truncated optimizer": ("optimizer.pt", lambda path: os.truncate(path, path.stat().st_size - 100)),
    "missing scheduler": ("scheduler.pt", lambda path: path.unlink()),
    "missing RNG state": ("rng_state.pth", lambda path: path.unlink()),
    "missing run history": ("run_history.json", lambda path: path.unlink()),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_checkpoint_damage_is_found_and_named(interrupted_run, tmp_path, damage):
    checkpoint = shutil.copytree(interrupted_run / "checkpoint-4", tmp_path / "checkpoint-4")
    assert checkpoint_problem(checkpoint) is None
    name, harm = DAMAGE[damage]
    harm(checkpoint / name)
    problem = checkpoint_problem(checkpoint)
    assert problem is not None and (name in problem or "RNG" in problem or "scheduler" in problem), problem


@pytest.mark.parametrize("damage", ["truncated adapter", "empty trainer state"])
def test_a_damaged_checkpoint_falls_back_to_the_one_before(tiny_mistral_dir, tokenized, interrupted_run, tmp_path,
                                                           caplog, damage):
    shutil.copytree(interrupted_run, tmp_path / "run")
    name, harm = DAMAGE[damage]
    harm(tmp_path / "run" / "checkpoint-4" / name)
    with caplog.at_level(logging.WARNING, logger="alpaca_qlora.training.checkpoints"):
        metrics = run_training(make_job(tiny_mistral_dir, tokenized, tmp_path, max_steps=6, save_steps=2),
                               resume=True).metrics
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 6
    assert any("checkpoint-4" in record.getMessage() and name in record.getMessage() for record in caplog.records)
    assert (tmp_path / "run" / "damaged-checkpoint-4").is_dir()


def test_with_no_sound_checkpoint_training_starts_over(tiny_mistral_dir, tokenized, interrupted_run, tmp_path,
                                                        caplog):
    shutil.copytree(interrupted_run, tmp_path / "run")
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        (tmp_path / "run" / checkpoint / "trainer_state.json").write_text("")
    with caplog.at_level(logging.WARNING, logger="alpaca_qlora.training.checkpoints"):
        metrics = run_training(make_job(tiny_mistral_dir, tokenized, tmp_path, max_steps=6, save_steps=2),
                               resume=True).metrics
    assert metrics["resumed_from_step"] == 0 and metrics["steps"] == 6
    assert "starts over" in caplog.text


def test_a_typo_in_target_modules_is_refused(tiny_mistral_dir, tokenized, tmp_path):
    with pytest.raises(PipelineError, match=r"\['qproj'\] do not exist"):
        make_job(tiny_mistral_dir, tokenized, tmp_path,
                 lora=embedded_params(lora={"target_modules": ["qproj", "v_proj"]}).lora)


def test_packed_rows_never_attend_across_row_boundaries(tiny_mistral_dir, tokenized):
    model = load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu").eval()
    packed = PackedCollator()([tokenized])  # one bin holding every row
    with torch.no_grad():
        # Row boundaries are read from the position resets only without a KV cache, as in training.
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                              use_cache=False).logits[0]
        start = 0
        for row in tokenized:
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(packed_logits[start : start + len(alone)], alone, rtol=1e-4, atol=1e-4)
            start += len(alone)
    assert packed["position_ids"][0, len(tokenized[0]["input_ids"])] == 0


@pytest.mark.parametrize("max_seq_length", [2048, 100])  # all rows in one bin; bins of <= 100 tokens
def test_packed_and_padded_batches_give_the_same_gradient(tiny_mistral_dir, tokenized, tmp_path, max_seq_length):
    gradients, metrics = [], []
    for packing in (False, True):
        capture = GradientsAtStep()
        job = make_job(tiny_mistral_dir, tokenized, tmp_path / str(packing), max_steps=1, micro_batch_size=4,
                       packing=packing, max_grad_norm=0.0, callbacks=[capture], max_seq_length=max_seq_length)
        metrics.append(run_training(job, resume=False).metrics)
        gradients.append(capture.gradients)
    assert_same_gradients(gradients)
    # Padding never counts as a token seen: both layouts report the rows' own tokens.
    assert metrics[0]["tokens"] == metrics[1]["tokens"] == sum(len(row["input_ids"]) for row in tokenized)


def test_packing_into_bins_keeps_rows_apart_and_pads_only_the_tail(tiny_mistral_dir, tokenized):
    model = load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu").eval()
    lengths = [len(row["input_ids"]) for row in tokenized]
    dataset = PackedDataset(tokenized, bin_tokens=max(lengths) + 1, seed=0)
    groups = [dataset[index] for index in range(len(dataset))]
    assert len(groups) > 1 and all(sum(len(r["input_ids"]) for r in g) <= max(lengths) + 1 for g in groups)
    batch = PackedCollator(pad_token_id=0)(groups)
    assert batch["input_ids"].shape[0] == len(groups)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for index, group in enumerate(groups):
            start = 0
            for row in group:
                alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
                torch.testing.assert_close(logits[index, start : start + len(alone)], alone, rtol=1e-4, atol=1e-4)
                start += len(alone)
            assert (batch["labels"][index, start:] == IGNORE_INDEX).all()


def alpaca_like_rows(count: int, seed: int) -> list[dict]:
    """Rows with Alpaca's length spread (log-normal, median ~190 tokens, 48 to 1024), prompt tokens unlabelled."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        length = int(min(1024, max(48, rng.lognormvariate(math.log(190), 0.6))))
        rows.append({"id": str(index), "input_ids": [1] + [index % 30000 + 3] * (length - 1),
                     "labels": [IGNORE_INDEX] * (length // 2) + [5] * (length - length // 2)})
    return rows


@pytest.mark.parametrize("bin_tokens", [512, 2048])
def test_best_fit_bins_pad_at_most_two_percent_and_hold_every_row_once(bin_tokens):
    rows = [row for row in alpaca_like_rows(3000, seed=7) if len(row["input_ids"]) <= bin_tokens]
    dataset = PackedDataset(rows, bin_tokens=bin_tokens, seed=42)
    assert dataset.padding_share(bins_per_micro_batch=4) <= 0.02
    packed_ids = sorted(row["id"] for index in range(len(dataset)) for row in dataset[index])
    assert packed_ids == sorted(row["id"] for row in rows)
    assert all(sum(len(row["input_ids"]) for row in dataset[index]) <= bin_tokens for index in range(len(dataset)))
    assert PackedDataset(rows, bin_tokens=bin_tokens, seed=42).bins == dataset.bins  # seeded: the same bins


def test_a_row_longer_than_a_bin_is_refused():
    with pytest.raises(PipelineError, match="more than a bin"):
        best_fit_decreasing([10, 700], capacity=512, seed=0)


def test_an_epoch_of_packed_training_sees_every_row_exactly_once(tiny_mistral_dir, tokenized, tmp_path):
    rows = tokenized * 3
    seen: list[tuple[int, ...]] = []

    def record(module, args, kwargs):
        for ids, positions, labels in zip(kwargs["input_ids"], kwargs["position_ids"], kwargs["labels"]):
            starts = [*(positions == 0).nonzero().flatten().tolist(), len(ids)]
            for start, end in zip(starts, starts[1:]):
                if bool((labels[start:end] != IGNORE_INDEX).any()):  # a padding tail has no labelled token
                    seen.append(tuple(ids[start:end].tolist()))

    job = make_job(tiny_mistral_dir, rows, tmp_path, packing=True, max_steps=-1, epochs=1, micro_batch_size=2,
                   max_seq_length=100)
    hook = job.model.register_forward_pre_hook(record, with_kwargs=True)
    metrics = run_training(job, resume=False).metrics
    hook.remove()
    assert sorted(seen) == sorted(tuple(row["input_ids"]) for row in rows)
    assert metrics["attention"] == "sdpa"  # CPU keeps sdpa under the block-diagonal mask


def test_segment_boundaries_follow_position_resets_and_bin_starts():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    boundaries, longest = sequence_boundaries(positions, batch=2, length=6)
    assert boundaries.tolist() == [0, 3, 5, 6, 10, 12] and longest == 4


def test_liger_kernels_are_refused_without_cuda(tiny_mistral_dir):
    model = load_model(str(tiny_mistral_dir), plan_quantization("none", "cpu"), device="cpu")
    with pytest.raises(PipelineError, match="needs a CUDA GPU"):
        apply_liger_kernels(model, "cpu")


def test_collator_keeps_eos_labels_when_pad_is_eos():
    eos = 2
    rows = [{"input_ids": [1, 5, 6, eos], "labels": [-100, -100, 6, eos]}, {"input_ids": [1, 5], "labels": [-100, 5]}]
    batch = ResponseOnlyCollator(pad_token_id=eos)(rows)
    assert batch["labels"].tolist() == [[-100, -100, 6, eos], [-100, 5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_an_adapter_names_its_base_model_and_a_mismatch_is_refused(tiny_mistral_dir, tokenized, tmp_path):
    job = make_job(tiny_mistral_dir, tokenized, tmp_path, max_steps=1)
    run_training(job, resume=False)
    save_adapter(job.model, job.tokenizer, tmp_path / "adapter", "card", model_name="org/other-model",
                 template=ALPACA)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/other-model"
    with pytest.raises(PipelineError, match="trained on base model 'org/other-model'"):
        load_for_inference(str(tiny_mistral_dir), "none", adapter_dir=tmp_path / "adapter", device="cpu")


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


def test_frozen_weights_keep_the_compute_dtype_unless_fp32_is_asked(tiny_mistral_dir):
    from transformers import AutoModelForCausalLM

    for frozen_dtype, expected in (("compute", torch.bfloat16), ("fp32", torch.float32)):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_mistral_dir), dtype=torch.bfloat16)
        model = prepare_quantized_model(model, gradient_checkpointing=False, frozen_dtype=frozen_dtype)
        assert model.get_input_embeddings().weight.dtype == expected
        assert model.lm_head.weight.dtype == expected
        assert not any(p.requires_grad for p in model.parameters())


def test_speed_switches_resolve_by_device():
    """auto: Liger and checkpointing on CUDA (measured to pay there), off on CPU; explicit values win."""
    auto = embedded_params().train
    assert resolve_speed_switches(auto, "cpu", liger_installed=True) == SpeedSwitches(False, False)
    assert resolve_speed_switches(auto, "cuda", liger_installed=True) == SpeedSwitches(True, True)
    assert resolve_speed_switches(auto, "cuda", liger_installed=False) == SpeedSwitches(False, True)
    # under FSDP too: the stage keeps the output projection, which Liger's cross-entropy reads, unsharded
    fsdp = dataclasses.replace(auto, distributed="fsdp", num_processes=2)
    assert resolve_speed_switches(fsdp, "cuda", liger_installed=True) == SpeedSwitches(True, True)
    forced = dataclasses.replace(auto, gradient_checkpointing=True, liger_kernels=False)
    assert resolve_speed_switches(forced, "cpu") == SpeedSwitches(False, True)
    offload = dataclasses.replace(auto, checkpoint_offload=True)
    with pytest.raises(PipelineError, match="gradient_checkpointing=true"):
        resolve_speed_switches(offload, "cpu")
    assert resolve_speed_switches(offload, "cuda", liger_installed=True).gradient_checkpointing


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
