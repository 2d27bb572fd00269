# One entry point for people and CI. `make train` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
METHOD ?= isif
DATASET ?= digits
LOGGER ?= wandb
VARIANT ?=
# the start time and 6 random hex digits: parallel runs started in the same second get their own folders
RUN_DIR ?= runs/$(METHOD)-$(DATASET)$(if $(VARIANT),-$(VARIANT))-$(shell date +%Y%m%d-%H%M%S)-$(shell od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
CONFIGS := experiments/configs
ARGS ?=

.PHONY: install train test bench seeds compare reproduce sweep eval export lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

METHOD_CONFIG := $(CONFIGS)/$(METHOD)/$(DATASET)$(if $(VARIANT),-$(VARIANT)).yaml

train: $(STAMP)
	@test -f $(METHOD_CONFIG) || { echo "no config $(METHOD_CONFIG); available:"; \
		ls $(CONFIGS)/*/*.yaml | grep -v -e datasets/ -e base.yaml | sed 's|$(CONFIGS)/||'; exit 2; }
	$(PY) -m experiments.train fit --config $(CONFIGS)/base.yaml --config $(CONFIGS)/datasets/$(DATASET).yaml \
		--config $(METHOD_CONFIG) --run.dir $(RUN_DIR) --run.logger $(LOGGER) \
		--run.method $(METHOD) --run.dataset $(DATASET) --run.variant "$(VARIANT)" $(ARGS)

compare: $(STAMP)
	$(PY) -m experiments.compare $(or $(RUNS),runs/*) $(ARGS)

# `make reproduce METHOD=isif TABLE=table8-digits`: every row of experiments/tables/<METHOD>-<TABLE>.yaml, then
# the table against the paper. DRY_RUN=1 prints the commands, SWEEP=1 a W&B grid, ROWS="full hard" a part,
# OUT=dir the folder (rows already there are kept), SEEDS="0 1 2" each row per seed, DATA_ROOT=dir
# the dataset's root, ARGS=... flags for every row.
TABLE ?=
reproduce: $(STAMP)
	@test -n "$(TABLE)" || { echo "give TABLE=<id>; tables:"; ls experiments/tables | sed 's/.yaml$$//'; exit 2; }
	$(PY) -m experiments.reproduce $(METHOD) $(TABLE) --logger $(LOGGER) $(if $(OUT),--out $(OUT)) \
		$(if $(ROWS),--rows $(ROWS)) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) \
		$(if $(DRY_RUN),--dry-run) $(if $(SWEEP),--sweep) $(if $(ARGS),-- $(ARGS))

# `make sweep METHOD=umm DATASET=cub`: creates the W&B sweep experiments/sweeps/<METHOD>_<DATASET>.yaml (or the
# digits one with its configs pointed at DATASET) and starts an agent; DRY_RUN=1 prints a few sampled trials.
sweep: $(STAMP)
	$(PY) -m experiments.sweep $(METHOD) $(DATASET) $(if $(DRY_RUN),--dry-run) $(if $(COUNT),--count $(COUNT)) $(ARGS)

# `make eval CKPT=runs/<run>/checkpoints/last.ckpt [DATASET=cars]`: the checkpoint's metrics with its run's
# config.yaml (on DATASET's config when given) into <run>/eval-<dataset>/eval_metrics.json; `make export CKPT=...`
# writes backbone.pt, head.pt and each eval split's embeddings / labels as .npy into <run>/export-<dataset>/.
# OUT=dir another folder; ARGS=... flags for `experiments.train validate`.
EVAL_DATASET = $(if $(filter command line environment,$(origin DATASET)),--dataset $(DATASET))
eval export: $(STAMP)
	@test -n "$(CKPT)" || { echo "give CKPT=<run dir>/checkpoints/last.ckpt"; exit 2; }
	$(PY) -m experiments.evaluate $@ $(CKPT) $(EVAL_DATASET) $(if $(OUT),--out $(OUT)) $(if $(ARGS),-- $(ARGS))

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m experiments.bench $(ARGS)

seeds: $(STAMP)
	$(PY) -m experiments.seeds $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf runs wandb lightning_logs .pytest_cache
