#!/usr/bin/env bash
# The train stage on the GPU with a random-init Mistral-7B-shaped model and the real Mistral tokenizer, 4-bit NF4,
# then the training benchmark. Run on the lent GPU machine from the project root, after installing .whl/:
#   bash bench/gpu_proof.sh OUT_DIR [LAYERS]
# LAYERS (optional) builds a shallower model for a quick smoke run.
set -euo pipefail
out=${1:?usage: gpu_proof.sh OUT_DIR [LAYERS]}
layers=${2:-}
model=/tmp/mistral-7b-random${layers:+-$layers}
export ALPACA_QLORA_MODEL_CACHE=/tmp/model-cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
[ -d "$model" ] || python bench/make_random_mistral.py "$model" ${layers:+--layers $layers}
python bench/set_params.py model.name="$model" model.quantization=nf4 train.max_seq_length=2048 \
  train.epochs=1 train.micro_batch_size=16 train.gradient_accumulation_steps=1 train.gradient_checkpointing=true \
  train.packing=true train.liger_kernels=true train.learning_rate=2e-4 train.logging_steps=2 train.dvclive=false
python stages/fetch.py && python stages/sample.py && python stages/format.py
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python stages/train.py 2>&1 | tr '\r' '\n' | grep -v "it/s]" | tail -20
cp metrics/train.json "$out/train_stage.json"
python bench/train_bench.py "$model" --out "$out/train_bench.json" --steps "${BENCH_STEPS:-8}" --warmup 2
