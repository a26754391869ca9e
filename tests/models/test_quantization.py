"""The 4-bit plan: NF4 where bitsandbytes can, the compute dtype by device, and bad requests refused."""
from __future__ import annotations

import pytest
import torch

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models import quantization
from alpaca_qlora.models.quantization import QuantizationPlan, plan_quantization


def test_plan_none_is_unquantized_fp32_on_cpu():
    plan = plan_quantization("none", "cpu")
    assert plan == QuantizationPlan(False, "model.quantization=none", torch.float32)


def test_plan_auto_on_cpu_uses_nf4_where_bitsandbytes_can():
    plan = plan_quantization("auto", "cpu")
    assert plan.quantized, plan.reason  # the pinned bitsandbytes 0.50.2 has a CPU 4-bit backend
    assert plan.compute_dtype == torch.float32 and "bitsandbytes" in plan.reason


def test_without_4bit_support_auto_falls_back_and_nf4_refuses(monkeypatch):
    monkeypatch.setattr(quantization, "probe_4bit", lambda device: (False, "no 4-bit backend for cpu"))
    plan = plan_quantization("auto", "cpu")
    assert not plan.quantized and "no 4-bit backend" in plan.reason
    with pytest.raises(PipelineError, match="nf4.*no 4-bit backend"):
        plan_quantization("nf4", "cpu")


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_plans_nf4_in_bf16_where_supported(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    monkeypatch.setattr(quantization, "probe_4bit", lambda device: (True, "fake CUDA bitsandbytes"))
    assert plan_quantization("auto", "cuda") == QuantizationPlan(True, "model.quantization=auto: fake CUDA "
                                                                 "bitsandbytes", expected)
    assert plan_quantization("none", "cuda").compute_dtype == expected


def test_bad_plan_requests_are_refused(monkeypatch):
    with pytest.raises(PipelineError, match="auto, nf4, none"):
        plan_quantization("int8", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match="no CUDA GPU"):
        plan_quantization("auto", "cuda")
