# resprune: `make demo` runs the main job, `make test` the test suite.
# Both create .venv when it is missing. torch/torchvision are pinned to the builds that pip
# takes from this machine's disk; installing them first means the project's own (looser)
# requirement installs nothing more.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.resprune-installed
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: venv test test-fast demo clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH) 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,width]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, torchvision, thop, onnx, onnxruntime, resprune" 
	@touch $(STAMP)

venv: $(STAMP)

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow and not dist"

demo: venv
	$(BIN)/resprune run quickstart

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
