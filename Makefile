# `make demo` and `make test` set everything up on a fresh machine (Python 3.9+ with venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FOLDKIT := $(BIN)/foldkit
OUT    := out

.PHONY: install demo test bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[torch,test,bench]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The whole pipeline on a bundled reference network: a ResNet-50 trained with SyncBatchNorm
# (random weights, realistic BN statistics) exported, folded, verified, gated and timed.
demo: $(STAMP)
	@mkdir -p $(OUT)
	@echo "== 1. export models/resnet.py:resnet50 (SyncBatchNorm) to ONNX, unfolded"
	$(FOLDKIT) export --model models/resnet.py:resnet50 --model-arg syncbn=True --input-shape 1,3,224,224 \
	    --dynamic-batch --no-fold -o $(OUT)/resnet50.onnx -q
	@echo "== 2. fold and verify on ONNX Runtime"
	$(FOLDKIT) fold $(OUT)/resnet50.onnx -o $(OUT)/resnet50.folded.onnx --report $(OUT)/resnet50.report.json
	@echo "== 3. the CI gate: the original fails it (exit 1, expected), the folded model passes"
	-$(FOLDKIT) check $(OUT)/resnet50.onnx --format text
	$(FOLDKIT) check $(OUT)/resnet50.folded.onnx
	@echo "== 4. latency, original vs folded, interleaved on ONNX Runtime CPU"
	$(FOLDKIT) bench $(OUT)/resnet50.onnx $(OUT)/resnet50.folded.onnx --ort-opt-level disable,all \
	    --warmup 5 --iters 30 --json $(OUT)/bench.json --plot $(OUT)/bench.png

bench: $(STAMP)
	$(BIN)/python benchmarks/zoo.py
	$(BIN)/python benchmarks/fold_speed.py

clean:
	rm -rf $(OUT) .pytest_cache .hypothesis
