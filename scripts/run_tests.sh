#!/usr/bin/env bash
# Runs every suite (CTest: GoogleTest cases, the find_package consumer, benchmark smoke; pytest; and, given a
# sanitizer build dir, the GoogleTest suite again under ASan + UBSan) and prints one closing line
# "N passed, N failed" summed over all of them, from their JUnit XML reports.
#
# With GRADIVEQ_TEST_FAST=1 (make test-fast) only the unit layer runs: the GoogleTest cases under CTest. Left
# out: the CTest cases labelled "package" (find_package consumer, the LibTorch example's training runs and
# fault drills) and "bench" (benchmark smoke runs), every pytest suite, and the sanitizer pass.
set -uo pipefail
BUILD_DIR=${1:-build}
PYTHON=${2:-.venv/bin/python}
SANITIZE_DIR=${3:-}
cd "$(dirname "$0")/.."
REPORTS=$BUILD_DIR/test-reports
rm -rf "$REPORTS" && mkdir -p "$REPORTS"

FAST=${GRADIVEQ_TEST_FAST:-0}
ctest_filter=()
[[ $FAST == 1 ]] && ctest_filter=(-LE 'package|bench')

echo "=== C++ (ctest${ctest_filter[*]:+ ${ctest_filter[*]}}) ==="
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" --timeout 900 "${ctest_filter[@]}" \
      --output-junit "$(pwd)/$REPORTS/ctest.xml"
ctest_rc=$?

pytest_rc=0
if [[ $FAST != 1 ]]; then
  echo "=== Python (pytest) ==="
  # The installed package (make install-python), not the source tree: no PYTHONPATH.
  "$PYTHON" -m pytest tests/python -q -p no:cacheprovider \
      --junitxml="$REPORTS/pytest.xml"
  pytest_rc=$?
fi

sanitize_rc=0
if [[ -n $SANITIZE_DIR ]]; then
  echo "=== C++ under AddressSanitizer + UndefinedBehaviorSanitizer (gtest) ==="
  # Leak checking is off: torch's static initialisation leaves reachable allocations that LeakSanitizer reports.
  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$SANITIZE_DIR/tests/gradiveq_tests" --gtest_brief=1 --gtest_output="xml:$(pwd)/$REPORTS/sanitize.xml"
  sanitize_rc=$?
fi

"$PYTHON" scripts/summarize_junit.py "$REPORTS"/*.xml
summary_rc=$?
if [[ $ctest_rc -ne 0 || $summary_rc -ne 0 || $sanitize_rc -ne 0 ]] || [[ $pytest_rc -ne 0 && $pytest_rc -ne 5 ]]; then
  exit 1
fi
