"""The training loop on a tiny random Mistral with the real Mistral tokenizer (CPU, seconds): steps, loss, the
saved adapter, gradient accumulation."""
from __future__ import annotations

import pytest
import torch

from alpaca_qlora.adapter import save_adapter
from alpaca_qlora.data.prompts import ALPACA
from alpaca_qlora.models.inference import load_for_inference
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.training.data import ResponseOnlyCollator
from alpaca_qlora.training.trainer import run_training
from support.params import embedded_params
from support.training import GradientsAtStep, assert_same_gradients, make_job


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


def test_train_loss_is_the_mean_step_loss_whatever_the_logging_interval(tiny_mistral_dir, tokenized, tmp_path):
    every_step, every_third = (
        run_training(make_job(tiny_mistral_dir, tokenized, tmp_path / str(interval), max_steps=7, save_steps=100,
                              logging_steps=interval), resume=False).metrics
        for interval in (1, 3))
    assert every_third["train_loss"] == pytest.approx(every_step["train_loss"], rel=1e-6)
