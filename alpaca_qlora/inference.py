"""Loading a model for answering: the base as training loaded it, with the adapter attached at runtime (no merge).

On CPU the loaded model is put on the float64 path (alpaca_qlora/numerics.py) before its first forward, so its
answers are the same on every CPU; on CUDA it stays in the plan's compute dtype."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models import QuantizationPlan, load_model, load_tokenizer, plan_quantization, resolve_model_source
from alpaca_qlora.numerics import to_cpu_float64

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    plan: QuantizationPlan
    device: str
    source: str
    numeric_path: dict[str, Any] = field(default_factory=dict)  # CPU: how it was made CPU-independent


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_adapter_matches(adapter_dir: Path, source: str, model_name: str) -> None:
    """Refuse an adapter trained on another base model: PEFT would load it into the wrong weights or fail late."""
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise PipelineError(f"{adapter_dir} holds no adapter (no adapter_config.json); run `dvc repro train` first.")
    trained_on = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if trained_on and trained_on not in (source, model_name):
        raise PipelineError(
            f"the adapter in {adapter_dir} was trained on base model {trained_on!r}, not {model_name!r} "
            f"({source}). Use the matching model.name or retrain the adapter."
        )


def load_for_inference(model_name: str, quantization: str, adapter_dir: Path | None = None,
                       device: str | None = None) -> LoadedModel:
    device = device or default_device()
    plan = plan_quantization(quantization, device)
    source = resolve_model_source(model_name)
    if adapter_dir is not None:
        check_adapter_matches(adapter_dir, source, model_name)
    tokenizer = load_tokenizer(source, padding_side="left")
    model = load_model(source, plan, device=device)
    if adapter_dir is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        except (RuntimeError, ValueError, KeyError) as error:
            raise PipelineError(
                f"the adapter in {adapter_dir} does not fit base model {model_name!r}: {error}"
            ) from error
    model.eval()
    numeric_path = to_cpu_float64(model, quantized=plan.quantized) if torch.device(device).type == "cpu" else {}
    return LoadedModel(model=model, tokenizer=tokenizer, plan=plan, device=device, source=source,
                       numeric_path=numeric_path)
