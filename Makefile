# Two commands do everything: `make demo` and `make test` (see README.md).
# Both create .venv if missing, install torch first (torch==2.13.0: the CPU build on a
# machine without a GPU, the CUDA build elsewhere), then mimcore and its dependencies.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mimcore-installed
TORCH  := torch==2.13.0
DEMO_OUT ?= demo_output

.PHONY: setup data demo test bench study clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python MiMCore/pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e "MiMCore[test]"
	touch $(STAMP)

setup: $(STAMP)

data: setup
	$(BIN)/mim data samples

demo: setup
	$(BIN)/python Training/demo.py --output $(DEMO_OUT)

# pytest's exit code 5 (no test collected) is a failure, not a pass.
test: setup
	@$(BIN)/python -m pytest Testing -q -ra -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: setup
	$(BIN)/python Testing/benchmarks/bench_pretrain.py
	$(BIN)/python Testing/benchmarks/bench_segment.py

# The comparison study (Training/experiments/README.md): scratch, MAE, SimMIM, GMIM and MiM under one
# budget on the sample CTs; about 30 min on a 2-core CPU, resumable (run it again to continue).
# STUDY_ARGS passes options on, e.g. STUDY_ARGS="--dry-run" or "--results-dir Training/experiments/results/small".
STUDY_OUT ?= study_output/small
STUDY_ARGS ?=
study: setup
	$(BIN)/python Training/experiments/compare_methods.py --scale small --output $(STUDY_OUT) $(STUDY_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT)
