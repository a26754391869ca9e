"""The CPU numeric path: answers may not depend on the CPU's instruction set (issue 11).

bitsandbytes decides per layer, from its own `has_avx512bf16()`, whether to repack 4-bit weights for a bf16 kernel
at the first eval-mode forward; patching that switch lets an AVX2 machine take the decision an AVX512-BF16 one takes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alpaca_qlora.adapter import save_adapter
from alpaca_qlora.data.prompts import ALPACA, get_template
from alpaca_qlora.generation import generate
from alpaca_qlora.models.inference import load_for_inference
from alpaca_qlora.models.loading import load_model, load_tokenizer
from alpaca_qlora.models.numerics import Float64RMSNorm, base_weights_fingerprint, float64_norms
from alpaca_qlora.models.quantization import plan_quantization
from alpaca_qlora.training.model import attach_lora
from support import ROOT
from support.generation import QUESTIONS
from support.params import embedded_params

TEMPLATE = get_template("alpaca")
PROMPTS = [TEMPLATE.render(q, "") for q in ("What is the capital of France?", "Name a primary color.",
                                            "Write one sentence about the sea.", "What is 2+2?")]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_mistral_dir) -> Path:
    """A non-zero LoRA adapter on the tiny Mistral's NF4 base, so the finetuned path differs from the base."""
    plan = plan_quantization("nf4", "cpu")
    model = attach_lora(load_model(str(tiny_mistral_dir), plan, device="cpu"),
                        embedded_params(lora={"r": 4, "alpha": 8}).lora,
                        quantized=True, gradient_checkpointing=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("numerics") / "adapter"
    save_adapter(model, load_tokenizer(str(tiny_mistral_dir)), out, "card", model_name=str(tiny_mistral_dir),
                 template=ALPACA)
    return out


def answer_ids(loaded) -> list[tuple[str, int]]:
    generations, _ = generate(loaded.model, loaded.tokenizer, PROMPTS, max_new_tokens=12, batch_size=4,
                              stop_markers=TEMPLATE.stop_markers, progress=False)
    return [(g.raw, g.new_tokens) for g in generations]


@pytest.mark.parametrize("with_adapter", [False, True])
def test_cpu_inference_never_takes_the_bitsandbytes_repack_path(monkeypatch, tiny_mistral_dir, adapter_dir,
                                                                with_adapter):
    import bitsandbytes.nn.modules as bnb_modules

    adapter = adapter_dir if with_adapter else None
    expected = answer_ids(load_for_inference(str(tiny_mistral_dir), "nf4", adapter_dir=adapter, device="cpu"))
    repacked = []

    def refuse_repack(*args, **kwargs):
        repacked.append(True)
        raise AssertionError("bitsandbytes repacked 4-bit weights for its AVX512-BF16 kernel")

    # what an AVX512-BF16 CPU decides (Linear4bit reads the switch when it is built, at load time)
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", refuse_repack)
    loaded = load_for_inference(str(tiny_mistral_dir), "nf4", adapter_dir=adapter, device="cpu")
    assert answer_ids(loaded) == expected  # generating would have repacked (refuse_repack raises)
    assert not repacked
    assert not any(isinstance(module, bnb_modules.Linear4bit) for module in loaded.model.modules())
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float64}
    assert loaded.numeric_path["compute_dtype"] == "float64"
    assert loaded.numeric_path["weights"] == "nf4 dequantized once to float64"


def test_auto_on_the_float64_path_gives_plain_tokens(embedded_model_dir):
    """What the evaluate stage runs on CPU: auto (our loop, finished rows dropped from the batch and the KV cache)
    on the float64 model gives plain generate()'s tokens, with rows ending at EOS at several steps and at the limit,
    in batches of uneven size."""
    loaded = load_for_inference(str(embedded_model_dir), "auto", device="cpu")
    prompts = [TEMPLATE.render(q, "") for q in QUESTIONS]
    answers, methods = {}, {}
    for method in ("plain", "auto"):
        generations, stats = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=30, batch_size=4,
                                      stop_markers=TEMPLATE.stop_markers, progress=False, method=method)
        answers[method], methods[method] = generations, stats["generation"]
    assert methods == {"plain": "plain", "auto": "fast"}
    assert answers["auto"] == answers["plain"]  # raw text, stopped_by_eos and new_tokens of every row
    ends = {g.new_tokens for g in answers["plain"] if g.stopped_by_eos}
    assert len(ends) >= 3 and any(not g.stopped_by_eos for g in answers["plain"])  # rows dropped at several steps


def test_float64_rms_norm_replaces_llamas_and_gemmas_formulas_and_keeps_any_other():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class ShiftedRMSNorm(LlamaRMSNorm):  # a formula neither covers: it must keep its own forward
        def forward(self, hidden_states):
            return super().forward(hidden_states) + 0.5

    model = torch.nn.Sequential(LlamaRMSNorm(8, eps=1e-6), Gemma2RMSNorm(8, eps=1e-6), ShiftedRMSNorm(8, eps=1e-6))
    with torch.no_grad():
        for index, norm in enumerate(model):
            norm.weight.uniform_(-0.5, 1.5, generator=torch.Generator().manual_seed(index))
    probe = torch.randn(2, 8, dtype=torch.float64)
    expected = [norm(probe.float()).double() for norm in model[:2]]  # Gemma's computes in fp32 whatever it gets
    replaced, kept = float64_norms(model)
    assert (replaced, kept) == (2, ["ShiftedRMSNorm"])
    for norm, reference in zip(model[:2], expected):
        assert isinstance(norm, Float64RMSNorm)
        result = norm.to(torch.float64)(probe)
        assert result.dtype == torch.float64
        torch.testing.assert_close(result, reference, rtol=1e-6, atol=1e-6)


def test_a_left_padded_row_of_an_eager_model_gets_its_own_logits_in_float64(tiny_family):
    """Gemma 2 runs eager attention; transformers' eager softmax in fp32 turns the float64 mask's minimum into -inf,
    and a padded row came out NaN. On the float64 path it must equal the row run alone."""
    loaded = load_for_inference(str(tiny_family("gemma2")), "none", device="cpu")
    assert "softmax in float64" in loaded.numeric_path["kernel_path"]
    tokenizer = loaded.tokenizer
    long, short = (tokenizer(text)["input_ids"] for text in ("Name three colours of the rainbow, please.", "Hi"))
    pad = len(long) - len(short)
    input_ids = torch.tensor([long, [tokenizer.pad_token_id] * pad + short])
    attention_mask = torch.tensor([[1] * len(long), [0] * pad + [1] * len(short)])
    with torch.no_grad():
        batch = loaded.model(input_ids=input_ids, attention_mask=attention_mask).logits
        alone = loaded.model(input_ids=torch.tensor([short])).logits
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch[1, pad:], alone[0], rtol=1e-9, atol=1e-9)


def test_base_weights_fingerprint_hashes_weights_and_tokenizer(tiny_mistral_dir, tmp_path):
    fingerprint = base_weights_fingerprint(str(tiny_mistral_dir))
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(fingerprint)
    assert all(len(value) == 64 for value in fingerprint.values())
    assert base_weights_fingerprint("mistralai/Mistral-7B-Instruct-v0.2") == {
        "hub_id": "mistralai/Mistral-7B-Instruct-v0.2"}


AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
ANSWER_SCRIPT = """
import json, sys
from alpaca_qlora.generation import generate
from alpaca_qlora.models.inference import load_for_inference, with_float32_copy
import torch
loaded = with_float32_copy(load_for_inference(sys.argv[1], "nf4", device="cpu"))
prompts = json.loads(sys.argv[2])
answers = {}
for method in ("plain", "auto"):  # auto: what the evaluate stage runs on CPU (float32 copy, float64 near ties)
    generations, _ = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=40, batch_size=8,
                              stop_markers=[], progress=False, method=method, float32_copy=loaded.float32_copy)
    answers[method] = [[g.raw, g.new_tokens] for g in generations]
print(json.dumps(answers) + "\\n" + torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.slow
def test_embedded_answers_do_not_depend_on_the_cpu_kernels(embedded_model_dir):
    """The embedded model answers the same with torch/MKL/oneDNN held to AVX2 as with this CPU's best kernels
    (where this CPU has AVX512; the GPU machines' AVX512-BF16/AMX CPUs: bench/results/cpu_determinism.json)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("needs a CPU whose best torch kernels are not the AVX2 ones")
    prompts = [TEMPLATE.render(q, "") for q in ("Name the chemical symbol of sodium.", "What is the capital of "
               "Peru?", "Classify 'I hated it' as positive or negative.", "Describe the moon in two sentences.",
               "List three noble gases.", "What language is spoken in Brazil?")]
    answers = {}
    for name, extra in (("best", {}), ("avx2", AVX2_ONLY)):
        env = {**{k: v for k, v in os.environ.items() if k not in AVX2_ONLY}, **extra, "PYTHONPATH": str(ROOT),
               "ALPACA_QLORA_LOG_LEVEL": "WARNING"}
        result = subprocess.run([sys.executable, "-c", ANSWER_SCRIPT, str(embedded_model_dir), json.dumps(prompts)],
                                env=env, capture_output=True, text=True, check=True)
        out, capability = result.stdout.strip().rsplit("\n", 1)
        answers[name] = (json.loads(out), capability)
    assert answers["best"][1] == "AVX512" and answers["avx2"][1] == "AVX2"
    assert answers["best"][0] == answers["avx2"][0]
    assert answers["best"][0]["auto"] == answers["best"][0]["plain"]
