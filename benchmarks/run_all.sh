#!/usr/bin/env bash
# Every benchmark study in order (CPU), each timed, then RESULTS.md and summary.json.
#
#   benchmarks/run_all.sh            full runs: results in benchmarks/results/ (models cached in benchmarks/.cache)
#   benchmarks/run_all.sh --smoke    tiny sizes, results in $OUT_DIR (default: a temporary folder)
#
# Python: $PYTHON if set, else ./.venv/bin/python (./run setup creates it). Extra arguments after the
# optional --smoke go to every study (e.g. --threads 2 --device cpu). Run times are printed at the end and
# written to <results>/run_all_times.txt. Run it on a quiet machine: other processes distort the timings.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null 2>&1 || {
  echo "run_all.sh: $PYTHON not found: run ./run setup first (or set PYTHON)" >&2; exit 3; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

ARGS=()
if [ "${1:-}" = --smoke ]; then
  shift
  OUT_DIR=${OUT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/stealthmark-bench-smoke.XXXXXX")}
  ARGS=(--smoke --cache "${CACHE_DIR:-$OUT_DIR/cache}")
else
  OUT_DIR=${OUT_DIR:-benchmarks/results}
  [ -n "${CACHE_DIR:-}" ] && ARGS=(--cache "$CACHE_DIR")
fi
ARGS+=(--out-dir "$OUT_DIR" "$@")
mkdir -p "$OUT_DIR"

times=()
for study in null_calibration harmlessness baselines_study robustness speed; do
  t0=$SECONDS
  echo "== $study: $PYTHON benchmarks/$study.py ${ARGS[*]}"
  "$PYTHON" "benchmarks/$study.py" "${ARGS[@]}"
  times+=("$study $((SECONDS - t0)) s")
done
"$PYTHON" benchmarks/make_results.py --results-dir "$OUT_DIR"
printf '%s\n' "${times[@]}" "total $SECONDS s" | tee "$OUT_DIR/run_all_times.txt"
