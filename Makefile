# Two commands do everything: `make demo` and `make test` (see README.md).
# Both create .venv if missing, install torch first (torch==2.13.0: the CPU build on a
# machine without a GPU, the CUDA build elsewhere), then mimcore and its dependencies.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mimcore-installed
TORCH  := torch==2.13.0
DEMO_OUT ?= demo_output

.PHONY: setup data demo test bench study studio studio-browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python MiMCore/pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e "MiMCore[test,fast]"
	touch $(STAMP)

setup: $(STAMP)

data: setup
	$(BIN)/mim data samples

demo: setup
	$(BIN)/python Training/demo.py --output $(DEMO_OUT)

# MiM Studio (MiMSlicer/MiMStudio/README.md): trame-slicer, and Playwright for its browser tests.
STUDIO_STAMP := $(VENV)/.studio-installed
$(STUDIO_STAMP): $(STAMP) Testing/studio/requirements.txt
	$(BIN)/python -m pip install --quiet -r Testing/studio/requirements.txt
	touch $(STUDIO_STAMP)

# The browser tests drive Debian's Chromium (Playwright never downloads a browser here):
# installed with apt-get when missing and run as root; otherwise the tests say what to do.
studio-browser:
	@if [ -z "$$MIM_STUDIO_CHROMIUM" ] && [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "make test: the MiM Studio browser tests need Chromium: apt-get install chromium, or set MIM_STUDIO_CHROMIUM" >&2; fi; \
	fi

# MiM Studio in a browser: http://127.0.0.1:8765/ (STUDIO_ARGS e.g. "--data-dir ~/cts --port 9000";
# any --host other than 127.0.0.1 requires the access token it prints).
STUDIO_ARGS ?=
studio: setup $(STUDIO_STAMP)
	PYTHONPATH=MiMSlicer $(BIN)/python -m MiMStudio $(STUDIO_ARGS)

# pytest's exit code 5 (no test collected) is a failure, not a pass.
test: setup $(STUDIO_STAMP) studio-browser
	@$(BIN)/python -m pytest Testing -q -ra -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# bench: the `bench` extra (nnU-Net) with torch held at $(TORCH) (nnU-Net's timm would pull a newer torch
# through torchvision); a torchvision that does not load against this torch is removed (nnU-Net's
# predictor and planner do not need it, and MONAI would trip over a broken one).
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) MiMCore/pyproject.toml
	echo "$(TORCH)" > $(VENV)/bench-constraints.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/bench-constraints.txt -e "MiMCore[bench]"
	$(BIN)/python -c "import torchvision" 2>/dev/null || $(BIN)/python -m pip uninstall --quiet -y torchvision
	touch $(BENCH_STAMP)

# BENCH_SEGMENT_ARGS e.g. "--quick" (minutes) or "--bundle demo_output/finetune/model".
BENCH_SEGMENT_ARGS ?=
bench: setup $(BENCH_STAMP)
	$(BIN)/python Testing/benchmarks/bench_pretrain.py
	$(BIN)/python Testing/benchmarks/bench_segment.py $(BENCH_SEGMENT_ARGS)

# The comparison study (Training/experiments/README.md): scratch, MAE, SimMIM, GMIM and MiM under one
# budget on the sample CTs; about 30 min on a 2-core CPU, resumable (run it again to continue).
# STUDY_ARGS passes options on, e.g. STUDY_ARGS="--dry-run" or "--results-dir Training/experiments/results/small".
STUDY_OUT ?= study_output/small
STUDY_ARGS ?=
study: setup
	$(BIN)/python Training/experiments/compare_methods.py --scale small --output $(STUDY_OUT) $(STUDY_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT)
