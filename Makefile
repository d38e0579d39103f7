# Two commands on a fresh Debian 12 machine:
#   make test   set everything up (idempotent), build, run every C++ and Python test suite, and the C++ suite
#               again under AddressSanitizer + UndefinedBehaviorSanitizer
#   make demo   set everything up, build, run the demo
#   make test-fast  the unit layer only (GoogleTest cases; no package/example runs, benchmark smoke, pytest or
#               sanitizer pass): a few minutes once built
# Other targets: make setup | build | build-sanitize | test-sanitize | bench | format | clean

VENV      ?= .venv
PYTHON    := $(VENV)/bin/python
BUILD_DIR ?= build
JOBS      ?= $(shell nproc)
CMAKE_ARGS ?=

# ccache: rewrite absolute paths relative to the checkout, so fresh clones on the same machine hit the cache.
export CCACHE_BASEDIR := $(CURDIR)
export CCACHE_NOHASHDIR := true

.PHONY: all setup configure build build-sanitize install-python test test-fast test-sanitize demo bench format clean

all: build

setup:
	@bash scripts/setup.sh

$(BUILD_DIR)/build.ninja: CMakeLists.txt | setup
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DPython3_EXECUTABLE=$(abspath $(PYTHON)) $(CMAKE_ARGS)

configure: setup $(BUILD_DIR)/build.ninja

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

# The package as a user gets it (pyproject.toml: scikit-build-core over this CMake project, built against the
# venv's torch); the Python tests import this installed copy, not python/ in the source tree.
install-python: build
	$(PYTHON) -m pip install --no-build-isolation --no-deps -q .

test: build build-sanitize install-python
	@bash scripts/run_tests.sh $(BUILD_DIR) $(PYTHON) $(SANITIZE_DIR)

test-fast: build
	@GRADIVEQ_TEST_FAST=1 bash scripts/run_tests.sh $(BUILD_DIR) $(PYTHON)

# A short run of the ResNet-32 benchmark: 2 ranks, synthetic data, every method, 50 Mbit/s when it can shape.
demo: build
	$(PYTHON) benchmarks/ddp/resnet32_cifar100.py --bandwidth-mbit 50 --iters 25 --warmup-steps 3 \
	  --schedule 5,10,40 --out $(BUILD_DIR)/demo-results --tag demo_50mbit

# The long version, written to benchmarks/results/, plus the codec micro-benchmarks.
bench: build
	$(PYTHON) benchmarks/ddp/resnet32_cifar100.py --bandwidth-mbit 50 --iters 50 --repeats 3 --schedule 5,10,40 --out benchmarks/results
	$(PYTHON) benchmarks/ddp/resnet32_cifar100.py --bandwidth-mbit 200 --iters 50 --repeats 3 --schedule 5,10,40 --out benchmarks/results
	$(BUILD_DIR)/benchmarks/gradiveq_codec_bench --benchmark_min_time=0.5 --benchmark_repetitions=5 \
	  --benchmark_report_aggregates_only=true

# The C++ library and its GoogleTest suite under AddressSanitizer + UndefinedBehaviorSanitizer (own build dir;
# no Python module: the interpreter is not ASan-built). Leak checking is off: torch's static initialisation
# leaves reachable allocations that LeakSanitizer reports as leaks of libtorch, not of this project.
SANITIZE_DIR ?= build-sanitize
SANITIZER_ENV := ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
build-sanitize: setup
	cmake -S . -B $(SANITIZE_DIR) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DGRADIVEQ_SANITIZE=ON \
	  -DGRADIVEQ_BUILD_PYTHON=OFF -DGRADIVEQ_BUILD_BENCHMARKS=OFF -DGRADIVEQ_ENABLE_CUDA=OFF \
	  -DPython3_EXECUTABLE=$(abspath $(PYTHON)) $(CMAKE_ARGS)
	cmake --build $(SANITIZE_DIR) -j $(JOBS) --target gradiveq_tests

test-sanitize: build-sanitize
	$(SANITIZER_ENV) $(SANITIZE_DIR)/tests/gradiveq_tests

format:
	clang-format -i $$(git ls-files 'include/*.h' 'src/*.h' 'src/*.cpp' 'tests/*.cpp' 'tests/*.h' 'benchmarks/*.cpp' 'python/*.cpp' 'examples/*.cpp' 'examples/*.h')

clean:
	rm -rf $(BUILD_DIR) $(SANITIZE_DIR) python/gradiveq/_C*.so
