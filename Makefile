# One entry point for people and CI. `make train` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
METHOD ?= isif
DATASET ?= digits
LOGGER ?= wandb
VARIANT ?=
RUN_DIR ?= runs/$(METHOD)-$(DATASET)$(if $(VARIANT),-$(VARIANT))-$(shell date +%Y%m%d-%H%M%S)
CONFIGS := experiments/configs
ARGS ?=

.PHONY: install train test bench seeds compare lint clean

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
	$(PY) -m experiments.compare $(or $(RUNS),runs/*)

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
