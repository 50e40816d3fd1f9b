# Two commands do everything: `make demo` and `make test` (see README.md).
# Both create .venv if missing, install torch first (torch==2.13.0: the CPU build on a
# machine without a GPU, the CUDA build elsewhere), then mimcore and its dependencies.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mimcore-installed
TORCH  := torch==2.13.0
DEMO_OUT ?= demo_output

.PHONY: setup data demo test bench clean

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

clean:
	rm -rf $(VENV) $(DEMO_OUT)
