"""Loading a model for answering: the base as training loaded it, with the adapter attached at runtime (no merge).

On CPU the loaded model is put on the float64 path (models/numerics.py) before its first forward, so its
answers are the same on every CPU; on CUDA it stays in the plan's compute dtype."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from alpaca_qlora.config import EMBEDDED_MODEL, EMBEDDED_MODEL_ORIGIN
from alpaca_qlora.errors import PipelineError
from alpaca_qlora.models.loading import load_model, load_tokenizer, resolve_model_source
from alpaca_qlora.models.numerics import FLOAT32_DECODING, float32_copy, to_cpu_float64
from alpaca_qlora.models.quantization import QuantizationPlan, plan_quantization

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    plan: QuantizationPlan
    device: str
    source: str
    numeric_path: dict[str, Any] = field(default_factory=dict)  # CPU: how it was made CPU-independent
    float32_copy: Any = None  # CPU, the fast loop: decodes, with `model` deciding near ties (with_float32_copy)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_adapter_matches(adapter_dir: Path, source: str, model_name: str) -> None:
    """Refuse an adapter trained on another base model: PEFT would load it into the wrong weights or fail late."""
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise PipelineError(f"{adapter_dir} holds no adapter (no adapter_config.json); run `dvc repro train` first.")
    trained_on = json.loads(config_file.read_text()).get("base_model_name_or_path")
    hub_origin = EMBEDDED_MODEL_ORIGIN if model_name == EMBEDDED_MODEL else None  # what a saved adapter names
    if trained_on and trained_on not in (source, model_name, hub_origin):
        raise PipelineError(
            f"the adapter in {adapter_dir} was trained on base model {trained_on!r}, not {model_name!r} "
            f"({source}). Use the matching model.name or retrain the adapter."
        )


def check_adapter_weights(adapter_dir: Path) -> None:
    """Refuse damaged adapter weights before PEFT loads them.

    Non-finite weights load without complaint and make every answer empty; a truncated file fails inside PEFT
    with an error that names neither the file nor the fix.
    """
    from safetensors import SafetensorError, safe_open

    weights = adapter_dir / ADAPTER_WEIGHTS
    fix = (f"restore it with `dvc checkout {adapter_dir}` (the copy DVC cached when train finished) or rerun "
           f"`dvc repro train`")
    if not weights.is_file():
        raise PipelineError(f"{weights} is missing: {fix}.")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = list(handle.keys())
            non_finite = [name for name in names if not torch.isfinite(handle.get_tensor(name)).all()]
    except (SafetensorError, OSError, RuntimeError) as error:
        raise PipelineError(f"{weights} is damaged ({type(error).__name__}: {error}): {fix}.") from error
    if non_finite:
        raise PipelineError(
            f"{weights} holds NaN or infinite weights in {len(non_finite)} of {len(names)} tensors (e.g. "
            f"{non_finite[0]}), which would make every answer empty: {fix}. If training wrote it so, its loss "
            f"diverged: lower train.learning_rate."
        )


def load_for_inference(model_name: str, quantization: str, adapter_dir: Path | None = None,
                       device: str | None = None) -> LoadedModel:
    device = device or default_device()
    plan = plan_quantization(quantization, device)
    source = resolve_model_source(model_name)
    if adapter_dir is not None:
        check_adapter_matches(adapter_dir, source, model_name)
        check_adapter_weights(adapter_dir)
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


def with_float32_copy(loaded: LoadedModel) -> LoadedModel:
    """`loaded` with a float32 copy of its float64 model for the fast loop to decode with (CPU; models/numerics.py).
    Make it once the weights are final (after prepare_for_generation), as the copy does not follow later changes."""
    if not loaded.numeric_path:
        return loaded
    copied = float32_copy(loaded.model)
    if copied is None:
        return loaded
    return replace(loaded, float32_copy=copied, numeric_path={**loaded.numeric_path, "decoding": FLOAT32_DECODING})
