# Everything a fresh machine needs is here: `make repro` and `make test` set up the venv themselves (once).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
INSTALLED := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
# pip warns about every package the machine's extra local index lacks; keep the output readable.
PIP := $(VENV)/bin/python -m pip install --quiet --quiet
FAMILY_PROFILES := llama-3.1-8b qwen2.5-7b gemma-2-9b phi-3.5-mini


.PHONY: setup repro test mistral $(FAMILY_PROFILES) infer chat compare-revs review sweep push pull clean clean-all

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
	ruff check .
	python -m pytest -q -n auto --dist loadfile

# The real run, profiles/mistral-7b.yaml (Mistral-7B-Instruct-v0.2 on alpaca-cleaned; needs a CUDA GPU and the hub):
# its keys over params.yaml, as `dvc exp run -S key=value` flags.
mistral: setup
	$(PIP) -r requirements-gpu.txt
	python -m alpaca_qlora.profiles profiles/mistral-7b.yaml -- dvc exp run --name mistral-7b

# The same run on another family: profiles/<name>.yaml (README: Supported models), e.g. `make llama-3.1-8b`.
$(FAMILY_PROFILES): setup
	$(PIP) -r requirements-gpu.txt
	python -m alpaca_qlora.profiles profiles/$@.yaml -- dvc exp run --name $@

# Answer one instruction with the base model + models/adapter: make infer Q="..." [INPUT="..."]
infer: setup
	python -m alpaca_qlora.infer "$(Q)" $(if $(INPUT),--input "$(INPUT)")

# Talk to the model: base and models/adapter loaded once; each line gets the base answer, then the fine-tuned one.
chat: setup
	python -m alpaca_qlora.infer --chat --compare

# Share results through the default DVC remote (.dvc/config): push after `dvc repro` and a commit; a reviewer's
# fresh clone pulls instead of retraining. Experiments: dvc exp push origin NAME / dvc exp pull origin NAME.
push: setup
	dvc push

pull: setup
	dvc pull

# Fine-tuned predictions of two revisions or experiments, row by row, with intervals: make compare-revs A=main B=<exp>
compare-revs: setup
	python -m alpaca_qlora.evaluation.compare_revisions "$(A)" "$(B)" $(if $(JSON),--json "$(JSON)")

# The review a PR gets, in reports/review.md: REV (default: the workspace) against BASE. CI posts it (.ci/review.sh).
BASE ?= main
review: setup
	python -m alpaca_qlora.evaluation.review "$(BASE)" $(REV)

# A grid of experiments through DVC's queue, JOBS at a time (one per GPU where there are GPUs), ranked by EM delta:
# make sweep GRID="lora.r=8,16,32 train.learning_rate=1e-4,2e-4" [JOBS=2] [GPUS=0,1]
sweep: setup
	python -m alpaca_qlora.sweep $(GRID) $(if $(JOBS),--jobs $(JOBS)) $(if $(GPUS),--gpus $(GPUS))

# Remove the pipeline's outputs (not the venv, not the converted base model in the model cache).
clean:
	rm -rf data/raw data/sampled data/formatted data/predictions models/adapter models/release models/checkpoints \
		metrics/*.json metrics/plots metrics/train_log reports

clean-all: clean
	rm -rf $(VENV) .dvc/cache .dvc/tmp
