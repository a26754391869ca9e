"""How far apart two saved adapters are: the multi-node check (2 nodes of 1 GPU against 1 node of 2 GPUs).

    python -m bench.compare_adapters REFERENCE_DIR OTHER_DIR --out OUT/multinode.json [--tolerance 0.01]

The measure is each tensor's relative L2 difference, ||other - reference|| / ||reference||, worst over tensors. On
GPUs two runs of the same training are not bit-equal (bf16, atomics in attention's backward), so the tolerance is
a relative one; on CPU the tests compare with torch.testing.assert_close instead.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

WEIGHTS = "adapter_model.safetensors"


def adapter_difference(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, object]:
    if reference.keys() != other.keys():
        return {"same_keys": False, "only_in_reference": sorted(reference.keys() - other.keys())[:5],
                "only_in_other": sorted(other.keys() - reference.keys())[:5]}
    relative = {}
    for name, weight in reference.items():
        weight, theirs = weight.double(), other[name].double()
        relative[name] = float((theirs - weight).norm() / weight.norm().clamp_min(1e-30))
    worst = max(relative, key=relative.get)
    return {"same_keys": True, "tensors": len(relative), "worst_relative_l2": relative[worst], "worst_tensor": worst,
            "max_abs_diff": max(float((other[n].double() - w.double()).abs().max()) for n, w in reference.items()),
            "bit_equal": all(torch.equal(other[n], w) for n, w in reference.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tolerance", type=float, default=0.01, help="largest worst_relative_l2 that passes")
    arguments = parser.parse_args()
    reference, other = (load_file(str(path / WEIGHTS)) for path in (arguments.reference, arguments.other))
    result = adapter_difference(reference, other)
    result.update(reference=str(arguments.reference), other=str(arguments.other), tolerance=arguments.tolerance,
                  within_tolerance=bool(result["same_keys"] and result["worst_relative_l2"] <= arguments.tolerance))
    arguments.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
