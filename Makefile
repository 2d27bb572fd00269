# One entry point for people and CI. `make train` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
METHOD ?= isif
DATASET ?= digits
LOGGER ?= wandb
RUN_DIR ?= runs/$(METHOD)-$(DATASET)-$(shell date +%Y%m%d-%H%M%S)
CONFIGS := experiments/configs
ARGS ?=

.PHONY: install train test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	@test -f $(CONFIGS)/$(METHOD)/$(DATASET).yaml || { echo "no config $(CONFIGS)/$(METHOD)/$(DATASET).yaml; available:"; \
		ls $(CONFIGS)/*/*.yaml | grep -v datasets/ | sed 's|$(CONFIGS)/||'; exit 2; }
	$(PY) -m experiments.train fit --config $(CONFIGS)/base.yaml --config $(CONFIGS)/datasets/$(DATASET).yaml \
		--config $(CONFIGS)/$(METHOD)/$(DATASET).yaml --run.dir $(RUN_DIR) --run.logger $(LOGGER) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m experiments.bench $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf runs wandb lightning_logs .pytest_cache
