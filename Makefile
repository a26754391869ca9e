# Everything a fresh machine needs is here: `make repro` and `make test` set up the venv themselves (once).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
INSTALLED := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
# pip warns about every package the machine's extra local index lacks; keep the output readable.
PIP := $(VENV)/bin/python -m pip install --quiet --quiet

# The real run: Mistral-7B-Instruct-v0.2 on 10% of yahma/alpaca-cleaned, LoRA r=16 on the seven projections,
# 2048 tokens, 1 epoch, W&B on. Needs a CUDA GPU and the Hugging Face hub.
MISTRAL := -S model.name=mistralai/Mistral-7B-Instruct-v0.2 -S model.quantization=nf4 \
	-S data.source=hub -S data.sample_frac=0.1 -S data.eval_size=500 \
	-S lora.r=16 -S lora.alpha=16 -S train.max_seq_length=2048 -S train.epochs=1 \
	-S train.learning_rate=2e-4 -S train.micro_batch_size=16 -S train.gradient_accumulation_steps=1 \
	-S train.packing=true -S train.warmup_ratio=0.03 -S train.save_steps=100 \
	-S train.wandb=true -S eval.max_new_tokens=auto -S eval.batch_size=32

.PHONY: setup repro test mistral infer clean clean-all

$(INSTALLED): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -r requirements-nodeps.txt
	$(PIP) --no-deps -e .
	touch $@

setup: $(INSTALLED)

repro: setup
	dvc repro

test: setup
	python -m pytest -q

mistral: setup
	$(PIP) -r requirements-gpu.txt
	dvc exp run --name mistral-7b $(MISTRAL)

# Answer one instruction with the base model + models/adapter: make infer Q="..." [INPUT="..."]
infer: setup
	python -m alpaca_qlora.infer "$(Q)" $(if $(INPUT),--input "$(INPUT)")

# Remove the pipeline's outputs (not the venv, not the converted base model in the model cache).
clean:
	rm -rf data/raw data/sampled data/formatted data/predictions models/adapter models/checkpoints \
		metrics/*.json metrics/plots metrics/train_log reports

clean-all: clean
	rm -rf $(VENV) .dvc/cache .dvc/tmp
