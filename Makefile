# kiln: one target per stage. Targets are artifact files, so a re-run redoes only what is stale.
SHELL   := /bin/bash
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
KILN    := $(VENV)/bin/kiln
MODEL   ?= models/zen-llama
NAME    ?= $(notdir $(MODEL))
OUT     ?= out/$(NAME)
STAMP   := $(VENV)/.kiln-setup

.PHONY: help setup export optimize engines tune compress-report bench-engine generate bench bench-deps gpu-check demo test test-quick test-real-scale lint typecheck fmt tiny-model eval-model clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: $(STAMP)  ## a .venv with every extra at the tested versions (constraints.txt; torch 2.13.0 CPU) and kiln installed editable

# torch goes first and alone: the pinned 2.13.0 CPU wheel installs from local disk in seconds, and
# once it is there no other package can pull a different torch. constraints.txt pins the rest.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[export,engine,serve,ray,dev]"
	@$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $@

export: $(OUT)/onnx/export.json  ## PyTorch -> ONNX with KV cache, checked against PyTorch (MODEL=dir)

$(OUT)/onnx/export.json: $(STAMP) $(wildcard $(MODEL)/*)
	$(KILN) export $(MODEL) --out $(OUT)/onnx

PRECISION ?= fp16
TARGET ?= tensorrt
OPT_DIR = $(OUT)/optimized-$(if $(filter onnxruntime,$(TARGET)),ort-)$(PRECISION)
optimize: $(OPT_DIR)/optimize.json  ## cleanup, fusions, precision passes; prints the pass table (PRECISION=fp32|fp16|bf16|int8|int4|fp8, TARGET=tensorrt|onnxruntime)

$(OPT_DIR)/optimize.json: $(OUT)/onnx/export.json
	$(KILN) optimize $(OUT)/onnx --out $(OPT_DIR) --target $(TARGET) --precision $(PRECISION) $(OPTIMIZE_FLAGS)

# Engines: one optimize artifact per precision in ENGINE_PRECISIONS, then every profile in PROFILES
# (names in models/gpus/, comma-separated, or all) from the artifact of its precision. `kiln build`
# skips engines whose ONNX, profile and library are unchanged, and prints the matrix table.
PROFILES ?= all
ENGINE_PRECISIONS ?= fp16 int8
engines: $(STAMP)  ## TensorRT engines per GPU profile + table of precision, size, build time (MODEL=dir PROFILES=all|a,b)
	@for p in $(ENGINE_PRECISIONS); do $(MAKE) --no-print-directory optimize PRECISION=$$p || exit 1; done
	$(KILN) build $(foreach p,$(ENGINE_PRECISIONS),$(OUT)/optimized-$(p)) --profile $(PROFILES) --out $(OUT)/engines

# kiln tune per target: the eval model on the CPU (measured) and two TensorRT-RTX profiles (engines
# built here, speed by the bandwidth cost model, measured: false). Cached trials make a rerun free.
# Default space on the eval model: 21 graphs on cpu, 17 and 19 on the two profiles (pruned and
# mixed graphs included; tune/README.md "Cost of the default space"); each tune logs its count.
TUNE_MODEL ?= models/eval-llama
TUNE_TARGETS ?= cpu rtx-ampere-ada-fp16 rtx-ada-fp8
tune: $(STAMP)  ## pick the recipe per target under a quality budget: out/tune/<model>/<target>/{tune.json,recipe.toml,report.md,pareto.png} (TUNE_TARGETS="cpu l4-fp16" TUNE_FLAGS="--budget max_kl_mean=1e-3")
	@for t in $(TUNE_TARGETS); do $(KILN) tune $(TUNE_MODEL) --target $$t $(TUNE_FLAGS) || exit 1; done

# Model sets: eval (every method + the pruning curve) and smollm (SmolLM-135M shape: size, CPU speed).
COMPRESS_MODELS ?= eval,smollm
compress-report: $(STAMP)  ## every compression method per model set (COMPRESS_MODELS=eval,smollm): tables (out/compress/report.md) and size/tok-s-vs-KL chart
	$(PY) -m bench.compress_report --out out/compress --models $(COMPRESS_MODELS) $(COMPRESS_FLAGS)

bench-engine: $(STAMP)  ## GPT-2-small-shaped engine build, kiln vs bare polygraphy convert: overhead ratio, peak memory, size
	$(PY) -m bench.engine_build --out out/bench-engine

PROMPT ?= Beautiful is better than
ARTIFACT ?= $(OUT)/onnx
generate: $(OUT)/onnx/export.json  ## text from an artifact (ARTIFACT=folder PROMPT="..." GENERATE_FLAGS="--stream --temperature 0.7")
	$(KILN) generate $(ARTIFACT) --prompt "$(PROMPT)" $(GENERATE_FLAGS)

bench: $(STAMP)  ## the race, interleaved, every runner at the same --threads: kiln vs HF eager vs ort-genai vs llama.cpp (after bench-deps), fp32/int8/int4, TTFT, tok/s b1/b4, roofline, chart; BENCH_FLAGS="--models smollm --runners kiln-static,genai"
	$(PY) -m bench.race --out out/bench $(BENCH_FLAGS)

# llama.cpp for the race, the serving peer and the speculation peer (llama-server's own lookup
# and draft-model decoding, bench/speculate_llamacpp.py), outside CI: one plain cmake build of
# the llama.cpp vendored in the llama-cpp-python source distribution (shared libllama,
# llama-server and llama-bench in build/llamacpp/cmake/bin; tens of minutes on 2 cores, natively
# for this CPU).
# The llama-cpp-python package is then installed WITHOUT compiling (LLAMA_BUILD=OFF): its ctypes
# bindings load the cmake-built libllama from LLAMA_CPP_LIB_PATH (bench/llamacpp_runner.py sets
# it). The unpacked sdist also carries llama.cpp's convert_hf_to_gguf.py and the gguf-py it
# imports (newer than gguf on PyPI, which is installed for its dependencies). Every installed
# package is pinned as a constraint, so torch and onnxruntime stay as they are.
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMACPP_DIR := build/llamacpp
LLAMACPP_SRC := $(LLAMACPP_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON)
LLAMACPP_BUILD := $(LLAMACPP_DIR)/cmake
bench-deps: $(STAMP)  ## llama.cpp for `make bench` and the serving peer (not CI): one cmake build (libllama, llama-server, llama-bench), llama-cpp-python bindings, gguf, sentencepiece, the GGUF converter
	@command -v cmake >/dev/null && command -v g++ >/dev/null || { echo "bench-deps needs cmake and a C++ compiler: apt-get install -y cmake build-essential"; exit 1; }
	mkdir -p $(LLAMACPP_DIR)
	test -f $(LLAMACPP_SRC).tar.gz || $(PY) -m pip download --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(LLAMACPP_DIR)
	test -d $(LLAMACPP_SRC) || tar xzf $(LLAMACPP_SRC).tar.gz -C $(LLAMACPP_DIR)
	cmake -S $(LLAMACPP_SRC)/vendor/llama.cpp -B $(LLAMACPP_BUILD) -DCMAKE_BUILD_TYPE=Release \
	  -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
	  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
	cmake --build $(LLAMACPP_BUILD) -j$$(nproc) --target llama llama-server llama-bench
	$(PY) -m pip freeze --exclude-editable | grep -v ' @ ' > $(LLAMACPP_DIR)/constraints.txt
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PY) -m pip install \
	  -c $(LLAMACPP_DIR)/constraints.txt $(LLAMACPP_SRC).tar.gz gguf==0.19.0 'sentencepiece<0.3'

# Serving: the bundled model exported with static KV slots, unless ARTIFACT= names a static folder.
.PHONY: serve load
STATIC_OUT ?= $(OUT)/onnx-static
RAY_REPLICAS ?= 1,2
MAX_CONTEXT ?= 512
SERVE_ARTIFACT = $(if $(filter command line environment,$(origin ARTIFACT)),$(ARTIFACT),$(STATIC_OUT))
$(STATIC_OUT)/export.json: $(STAMP) $(wildcard $(MODEL)/*)
	$(KILN) export $(MODEL) --out $(STATIC_OUT) --kv static --max-context $(MAX_CONTEXT)

serve: $(STAMP)  ## OpenAI-compatible server with continuous batching on 127.0.0.1:8000 (ARTIFACT=static folder SERVE_FLAGS="--port 9000 --slots 16")
	@if [ "$(SERVE_ARTIFACT)" = "$(STATIC_OUT)" ]; then $(MAKE) --no-print-directory $(STATIC_OUT)/export.json; fi
	$(KILN) serve $(SERVE_ARTIFACT) $(SERVE_FLAGS)

# `make load` by default: the SmolLM-135M-shaped bench model (random weights) as a static int4
# ONNX Runtime artifact, 8 slots, 2 threads, 128-token id prompts, 64 new tokens, 48 requests a
# level, with llama.cpp's llama-server beside it on the same weights at Q4_0 (skipped, saying
# why, when build/llamacpp/cmake/bin/llama-server is absent). ARTIFACT=folder serves that alone.
# RAY=1: the served artifact (ARTIFACT, default the bundled model's static export) single-process
# vs Ray Serve with RAY_REPLICAS replicas, then a replica kill (out/load/load_ray.json);
# RAY_MODEL=smollm: the SmolLM-135M-shaped static int4 artifact above with RAY_SMOLLM_FLAGS
# (RAY_THREADS ONNX Runtime threads per replica and for the single-process server).
RAY_THREADS ?= 2
RAY_SMOLLM_FLAGS ?= --prompt-tokens 128 --requests 48 --max-tokens 64 --slots 8 --threads $(RAY_THREADS)
RAY_TARGET = $(if $(filter smollm,$(RAY_MODEL)),--model smollm $(RAY_SMOLLM_FLAGS),--artifact $(SERVE_ARTIFACT))
LOAD_FLAGS ?= --prompt-tokens 128 --requests 48 --threads 2 --slots 8 --repeats 3
LOAD_ARTIFACT = $(if $(filter command line environment,$(origin ARTIFACT)),$(ARTIFACT),out/load-smollm/ort-int4)
# ADAPTIVE=1: `kiln serve` fixed vs `--adaptive --ttft-target` under one burst (bench/adaptive_ab.py)
# on the bundled model's static export, then on the SmolLM-shaped int4 one (ARTIFACT=folder: that
# alone); out/load/adaptive-{zen,smollm}/adaptive_ab.json.
ADAPTIVE_FLAGS ?= --threads 2 --slots 8 --rounds 3 --ttft-target 500
load: $(STAMP)  ## loopback load test at 1, 8, 32 streaming clients, kiln and llama-server side by side: req/s, TTFT p50/p99, tok/s, kiln's engine time split; then the prefill stall per chunk size; out/load/{load,stall}.json (URL=http://127.0.0.1:PORT to target a running server; RAY=1: single-process vs Ray Serve replicas and a replica kill, RAY_MODEL=smollm; ADAPTIVE=1: fixed vs adaptive under a burst)
	@if { { [ -n "$(RAY)" ] && [ -z "$(RAY_MODEL)" ]; } || [ -n "$(ADAPTIVE)" ]; } && [ "$(SERVE_ARTIFACT)" = "$(STATIC_OUT)" ]; then $(MAKE) --no-print-directory $(STATIC_OUT)/export.json; fi
	if [ -n "$(ADAPTIVE)" ]; then $(PY) -m bench.adaptive_ab --artifact $(SERVE_ARTIFACT) --out out/load/adaptive-$(if $(filter command line environment,$(origin ARTIFACT)),artifact,zen) $(ADAPTIVE_FLAGS) && \
	  { [ -n "$(filter command line environment,$(origin ARTIFACT))" ] || $(PY) -m bench.adaptive_ab --model smollm --out out/load/adaptive-smollm $(ADAPTIVE_FLAGS); }; \
	elif [ -n "$(RAY)" ]; then $(PY) -m bench.load_ray --out out/load $(RAY_TARGET) --replicas $(RAY_REPLICAS) --kill --autoscale; \
	else $(PY) -m bench.loadtest --out out/load $(if $(filter command line environment,$(origin ARTIFACT)),--artifact $(ARTIFACT),--model smollm --peer llama-server) $(if $(URL),--url $(URL)) $(LOAD_FLAGS); fi
	@if [ -z "$(URL)" ] && [ -z "$(RAY)" ] && [ -z "$(ADAPTIVE)" ]; then $(PY) -m bench.stall $(LOAD_ARTIFACT) --out out/load; fi

gpu-check: $(STAMP)  ## on a GPU host: build an engine for this GPU and prove the TensorRT backend end to end
	$(PY) -m bench.gpu_check --out out/gpu-check

demo: $(STAMP)  ## the whole pipeline on the bundled model: export, then generate its text from the ONNX
	$(KILN) demo --out out/demo

test: $(STAMP)  ## the test suite (CPU only; GPU tests skip with a reason)
	$(PY) -m pytest -q --durations=15

test-quick: $(STAMP)  ## the suite without the real-scale models (tests/real_scale/, the long part of make test)
	$(PY) -m pytest -q -m "not real_scale"

test-real-scale: $(STAMP)  ## only the SmolLM-135M- and Qwen2.5-0.5B-shaped export/optimize tests (make test runs them too)
	$(PY) -m pytest -q --durations=0 tests/real_scale

lint: $(STAMP) typecheck  ## ruff check, format check and mypy --strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy cannot map kiln.export to export/ (the package-dir mapping): lay the tree out as installed.
TYPECHECK := build/typecheck
typecheck: $(STAMP)  ## mypy --strict over kiln/ and the stage folders, as the installed package
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/kiln
	@for f in kiln/*; do ln -s $(CURDIR)/$$f $(TYPECHECK)/kiln/; done
	@for s in export optimize engine runtime models evaluate tune compress; do ln -s $(CURDIR)/$$s $(TYPECHECK)/kiln/$$s; done
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml --cache-dir $(CURDIR)/.mypy_cache kiln

fmt: $(STAMP)  ## ruff format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

tiny-model: $(STAMP)  ## retrain the bundled model (models/zen-llama) on CPU, seeded
	$(PY) -m kiln.models.train_zen --out models/zen-llama

eval-model: $(STAMP)  ## retrain the eval model (models/eval-llama) on the Python stdlib sources, CPU, seeded (~15 min on 2 cores)
	$(PY) -m kiln.models.train_eval --out models/eval-llama

clean:  ## remove build outputs (keeps .venv)
	rm -rf out .pytest_cache
