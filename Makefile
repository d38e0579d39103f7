# Two commands on a fresh Debian 12 machine:
#   make test   set everything up (idempotent), build, run every C++ and Python test suite
#   make demo   set everything up, build, run the demo
# Other targets: make setup | build | bench | format | clean

VENV      ?= .venv
PYTHON    := $(VENV)/bin/python
BUILD_DIR ?= build
JOBS      ?= $(shell nproc)
CMAKE_ARGS ?=

.PHONY: all setup configure build test demo bench format clean

all: build

setup:
	@bash scripts/setup.sh

$(BUILD_DIR)/build.ninja: CMakeLists.txt | setup
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DPython3_EXECUTABLE=$(abspath $(PYTHON)) $(CMAKE_ARGS)

configure: setup $(BUILD_DIR)/build.ninja

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	@bash scripts/run_tests.sh $(BUILD_DIR) $(PYTHON)

demo: build
	PYTHONPATH=python OMP_NUM_THREADS=2 $(PYTHON) examples/python/compressor_demo.py

bench: build
	bash benchmarks/run_codec_bench.sh $(BUILD_DIR)

format:
	clang-format -i include/gradiveq/*.h src/*.cpp tests/*.cpp tests/*.h benchmarks/*.cpp python/src/*.cpp

clean:
	rm -rf $(BUILD_DIR) python/gradiveq/_C*.so
