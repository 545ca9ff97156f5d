# `make demo` and `make test` set everything up on a fresh machine (Python 3.11+ with venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FOLDKIT := $(BIN)/foldkit
OUT    := out

.PHONY: install demo test bench clean

# The second pip line: real re-parameterizable network definitions for the tests (tests/test_real_reparam.py;
# timm for FastViT and RepViT, imported through tests/third_party.py, which stands in for torchvision),
# installed --no-deps beside our pinned torch (their own requirements would replace it).
$(STAMP): setup.cfg pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "foldkit needs Python 3.11+ (found %d.%d): run make PYTHON=python3.11 ..." % sys.version_info[:2])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[torch,test,bench]"
	$(BIN)/python -m pip install --quiet --no-deps repvgg-pytorch==1.0.1 mobileone-pytorch==0.1.0 timm==1.0.29
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The whole pipeline on a bundled reference network: a ResNet-50 trained with SyncBatchNorm
# (random weights, realistic BN statistics) exported, folded, verified, gated and timed.
# A short summary first; `make demo V=1` prints every step's tables.
V ?=
DEMO_FLAGS := $(if $(V),-v,-q)
demo: $(STAMP)
	@mkdir -p $(OUT)
	@echo "== 1/4 export models/resnet.py:resnet50 (SyncBatchNorm) to ONNX, unfolded"
	@$(FOLDKIT) export --model models/resnet.py:resnet50 --model-arg syncbn=True --input-shape 1,3,224,224 \
	    --dynamic-batch --no-fold -o $(OUT)/resnet50.onnx --report $(OUT)/export.json $(DEMO_FLAGS)
	@echo "== 2/4 fold, and verify on ONNX Runtime"
	@$(FOLDKIT) fold $(OUT)/resnet50.onnx -o $(OUT)/resnet50.folded.onnx --report $(OUT)/resnet50.report.json $(DEMO_FLAGS)
	@echo "== 3/4 the CI gate on the original (expected to fail) and the folded model"
	@$(FOLDKIT) check $(OUT)/resnet50.onnx --format json -o $(OUT)/check.original.json $(DEMO_FLAGS); test $$? -eq 1
	@$(FOLDKIT) check $(OUT)/resnet50.folded.onnx --format json -o $(OUT)/check.folded.json $(DEMO_FLAGS)
	@echo "== 4/4 latency, original vs folded, interleaved on ONNX Runtime CPU"
	@$(FOLDKIT) bench $(OUT)/resnet50.onnx $(OUT)/resnet50.folded.onnx --ort-opt-level disable,all \
	    --warmup 5 --iters 30 --json $(OUT)/bench.json --plot $(OUT)/bench.png $(DEMO_FLAGS)
	@echo
	@$(BIN)/python benchmarks/demo_summary.py $(OUT)

bench: $(STAMP)
	$(BIN)/python benchmarks/zoo.py
	$(BIN)/python benchmarks/fold_speed.py
	$(BIN)/python benchmarks/reparam.py

clean:
	rm -rf $(OUT) .pytest_cache .hypothesis
