# esft - build, test, run, bench. `make help` lists the targets.
# Knobs (override on the command line): CC, CFLAGS, NO_CUDA=1, FUZZ_SECONDS, PYTHON.

CC        ?= cc
CXX       ?= c++
PYTHON    ?= python3
# -fopenmp when the compiler can build and link with it: the CPU kernels then use
# all cores (esft_set_num_threads; same bits for any count). OPENMP= turns it off.
ifeq ($(origin OPENMP),undefined)
OPENMP    := $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo -fopenmp)
endif
OPT       ?= -O2 -march=native $(OPENMP)
WARN       = -Wall -Wextra -pedantic -Werror
CFLAGS    ?= $(OPT) -std=c99 $(WARN)
LDLIBS     = -lm
BUILD     ?= build
FUZZ_SECONDS ?= 30

NVCC := $(shell command -v nvcc 2>/dev/null)
ifeq ($(NO_CUDA),1)
NVCC :=
endif
# sm_80 and sm_90 machine code, plus compute_90 PTX that newer GPUs JIT-compile
NVCCFLAGS ?= -O2 -std=c++17 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
             -gencode arch=compute_90,code=compute_90
NVCC_WARN  = -Xcompiler -Wall,-Wextra,-Werror
# CUDA parts: built by `all` (so `make test` runs test_cuda) only when nvcc exists.
ifneq ($(NVCC),)
CUDA_BIN    = $(BUILD)/tests/test_cuda $(BUILD)/examples/cuda_route
endif

TEST_SRC    = $(wildcard tests/test_*.c)
TEST_BIN    = $(patsubst tests/%.c,$(BUILD)/tests/%,$(TEST_SRC))
EXAMPLE_SRC = $(filter-out examples/esft_cli.c,$(wildcard examples/*.c))
EXAMPLE_BIN = $(patsubst examples/%.c,$(BUILD)/examples/%,$(EXAMPLE_SRC))
BENCH_SRC   = $(wildcard bench/bench_*.c)
BENCH_BIN   = $(patsubst bench/%.c,$(BUILD)/bench/%,$(BENCH_SRC))
FUZZ_SRC    = $(wildcard tests/fuzz_*.c)
DATA        = $(BUILD)/data/translation/expert_weights_1.txt

.PHONY: all test run analysis bench bench-train sanitize fuzz cuda bench-cuda gpu-check features help clean deps

all: features $(BUILD)/esft $(EXAMPLE_BIN) $(TEST_BIN) $(CUDA_BIN)

help:
	@echo "make run       the end-to-end demo: an HF MoE checkpoint on real task text, ESFT vs FFT vs LoRA vs PESC"
	@echo "               (CPU, about a minute; DEMO_FLAGS=--quick for seconds, =--help for options)"
	@echo "make analysis  ESFT expert analysis of the authors' DeepSeek-V2-Lite routing logs"
	@echo "make test      the whole test suite (prints 'N passed, N failed, N skipped')"
	@echo "make bench     benchmarks (need libopenblas-dev for the BLAS baselines)"
	@echo "make bench-train  esft train against transformers + torch, same run (needs torch +"
	@echo "               transformers; a few minutes; BENCH_TRAIN_ARGS=--help for options)"
	@echo "make sanitize  tests under ASan+UBSan, then valgrind"
	@echo "make fuzz      libFuzzer targets, FUZZ_SECONDS each (needs clang)"
	@echo "make cuda      esft_cuda.cu and its tests (needs nvcc)"
	@echo "make bench-cuda  the CUDA backend at V2-Lite size beside cuBLAS (needs a GPU; BENCH_CUDA_ARGS)"
	@echo "make gpu-check the GPU machine's whole check: test_cuda, compute-sanitizer, bench-cuda"
	@echo "               (logs under \$$OUT or $(BUILD)/gpu-check/; docs/cuda.md)"

features:
	@if [ -n "$(OPENMP)" ]; then echo "✓ OpenMP ($(OPENMP)): CPU kernels on all cores"; else echo "✗ OpenMP: not available (or OPENMP=): CPU kernels on one thread"; fi
	@if [ -n "$(NVCC)" ]; then echo "✓ CUDA: $(NVCC)"; else echo "✗ CUDA: nvcc not found (or NO_CUDA=1): CPU only"; fi
	@if command -v clang >/dev/null 2>&1; then echo "✓ clang (fuzzing)"; else echo "✗ clang not found: make fuzz unavailable"; fi
	@if $(PYTHON) -c "import numpy" 2>/dev/null; then echo "✓ numpy (oracles)"; else echo "✗ numpy missing: oracle tests skip (pip install numpy safetensors)"; fi

$(BUILD)/esft: examples/esft_cli.c esft.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -I. $< -o $@ $(LDLIBS)

$(BUILD)/examples/%: examples/%.c esft.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -I. $< -o $@ $(LDLIBS)

$(BUILD)/tests/%: tests/%.c esft.h tests/harness.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -I. $< -o $@ $(LDLIBS) $(TEST_LDLIBS)

# CUDA: esft_cuda.cu compiled once, linked into its test and example.
ifneq ($(NVCC),)
cuda: $(CUDA_BIN)
else
cuda:
	@echo "make cuda: nvcc not found (or NO_CUDA=1)"; exit 1
endif

$(BUILD)/cuda/esft_cuda.o: esft_cuda.cu esft.h
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) $(NVCC_WARN) -I. -c $< -o $@

$(BUILD)/tests/test_cuda: tests/test_cuda.cu $(BUILD)/cuda/esft_cuda.o esft.h tests/harness.h
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) $(NVCC_WARN) -I. $< $(BUILD)/cuda/esft_cuda.o -o $@ -lcublas

$(BUILD)/examples/cuda_route: examples/cuda_route.cu $(BUILD)/cuda/esft_cuda.o esft.h
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) $(NVCC_WARN) -I. $< $(BUILD)/cuda/esft_cuda.o -o $@ -lcublas

$(BUILD)/bench/bench_cuda: bench/bench_cuda.cu $(BUILD)/cuda/esft_cuda.o esft.h
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) $(NVCC_WARN) -I. $< $(BUILD)/cuda/esft_cuda.o -o $@ -lcublas

# The CUDA benchmark (bench/bench_cuda.cu): exit 2 with the reason when there is no GPU.
BENCH_CUDA_ARGS ?=
ifneq ($(NVCC),)
bench-cuda: $(BUILD)/bench/bench_cuda
	$(BUILD)/bench/bench_cuda $(BENCH_CUDA_ARGS)
else
bench-cuda:
	@echo "make bench-cuda: nvcc not found (or NO_CUDA=1)"; exit 1
endif

# Everything owed on a GPU machine, in one script (tests/gpu_check.sh, docs/cuda.md).
gpu-check:
	@BUILD=$(BUILD) NVCC="$(NVCC)" MAKE="$(MAKE)" sh tests/gpu_check.sh

# The vendored routing logs (data/README.md says where they come from).
$(DATA): data/esft-translation.tar.xz
	@mkdir -p $(BUILD)/data
	tar xJf $< -C $(BUILD)/data
	@touch $@

test: all $(DATA)
	@ESFT_DATA=$(BUILD)/data BUILD=$(BUILD) PYTHON=$(PYTHON) NVCC="$(NVCC)" CC="$(CC)" CXX="$(CXX)" sh tests/run_all.sh

# The demo (examples/demo.c, docs/demo.md); outputs in $(BUILD)/run/.
DEMO_FLAGS ?=
run: $(BUILD)/examples/demo
	@$(BUILD)/examples/demo --out $(BUILD)/run $(DEMO_FLAGS)

# The ESFT analysis of the vendored routing logs; outputs in $(BUILD)/analysis/.
analysis: $(BUILD)/esft $(DATA)
	@sh examples/run_analysis.sh $(BUILD)

bench: $(BUILD)/esft $(DATA)
	@BUILD=$(BUILD) CC="$(CC)" sh bench/run_all.sh

# esft train vs transformers + torch on bench_models.py's checkpoint (docs/training.md)
BENCH_TRAIN_ARGS ?=
bench-train: $(BUILD)/esft
	@$(PYTHON) bench/bench_train.py --esft $(BUILD)/esft --out $(BUILD)/bench_models $(BENCH_TRAIN_ARGS)

sanitize: $(DATA)
	@BUILD=$(BUILD)/asan ESFT_DATA=$(BUILD)/data CC="$(CC)" sh tests/sanitize.sh

fuzz:
	@BUILD=$(BUILD)/fuzz FUZZ_SECONDS=$(FUZZ_SECONDS) sh tests/fuzz.sh

clean:
	rm -rf $(BUILD)
