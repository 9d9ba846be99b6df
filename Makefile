# Thin front end over DVC: the pipeline itself lives in dvc.yaml, hyper-parameters in params.yaml.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
PYTHON ?= python3
GPUS ?= 1
PORT ?= 10097
PRESET ?= presets/internvl2-1b-ui.yaml
BENCH_ARGS ?=
export GPUS
export PATH := $(abspath $(VENV))/bin:$(PATH)

STAMP := $(VENV)/.installed

.PHONY: help venv data pretrained train merge export-upstream eval repro test tensorboard exp real demo bench bench-train bench-gpus bench-inputs

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

venv: $(STAMP) ## create .venv with the pinned dependencies (requirements.lock)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.lock
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

data: $(STAMP) ## stage data: build or download the dataset
	dvc repro data

pretrained: $(STAMP) ## stage pretrained: build or download the base model, convert to native
	dvc repro pretrained

train: $(STAMP) ## stage train: LoRA fine-tuning on GPUS processes (make train GPUS=2)
	dvc repro train

merge: $(STAMP) ## stage merge: merge the adapter into the base model
	dvc repro merge

export-upstream: $(STAMP) ## stage export: the merged model in the upstream layout (work_dirs/merged_upstream)
	dvc repro export

eval: $(STAMP) ## stage eval: metrics of the base and fine-tuned models
	dvc repro eval

repro: $(STAMP) ## run the whole pipeline (only what changed), then show the metrics
	dvc repro
	dvc metrics show

test: $(STAMP) ## run the test suite (CPU; GPU tests are opt-in: pytest -m gpu)
	pytest -q

tensorboard: $(STAMP) ## serve the training logs on localhost (PORT=10097)
	tensorboard --logdir work_dirs/tensorboard --host 127.0.0.1 --port $(PORT)

exp: $(STAMP) ## run a variant: make exp SET='train.learning_rate=5e-4'
	dvc exp run $(foreach s,$(SET),-S $(s))
	dvc exp show --no-pager

# IMAGE and PROMPT reach the recipe through the environment, so quotes inside PROMPT need no escaping.
demo: $(STAMP) ## ask the fine-tuned model: make demo IMAGE=shot.png PROMPT="..." (no PROMPT: chat)
	@test -n "$$IMAGE" || { echo 'usage: make demo IMAGE=path/to/screenshot.png [PROMPT="..."]'; exit 2; }
	python -m internvl_sft.demo --image "$$IMAGE" $${PROMPT:+--prompt "$$PROMPT"}

real: $(STAMP) ## run a preset as a DVC experiment (PRESET=presets/internvl2-1b-ui.yaml: the seed recipe)
	bash shell/run_preset.sh $(PRESET)

# No venv prerequisite: on a GPU machine with torch, transformers and peft installed, this runs from the checkout.
bench: ## training-step speed, stock vs fast path (BENCH_ARGS="--size 1b --steps 20"; --help lists the options)
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} python3 -m internvl_sft.bench $(BENCH_ARGS)

bench-train: ## whole training runs, stock vs fast settings: wall time and loss curves (BENCH_ARGS="--preset presets/internvl2-1b-random.yaml")
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} python3 -m internvl_sft.bench_train $(BENCH_ARGS)

bench-gpus: ## the same training on 1 and 2 GPUs: throughput ratio and loss agreement (BENCH_ARGS="--preset presets/internvl2-1b-random.yaml --gpus 1 2")
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} python3 -m internvl_sft.bench_gpus $(BENCH_ARGS)

bench-inputs: ## input-pipeline speed: samples/s of tiling + tokenisation per data-loader worker count (BENCH_ARGS="--tile-size 448")
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} python3 -m internvl_sft.bench_inputs $(BENCH_ARGS)
