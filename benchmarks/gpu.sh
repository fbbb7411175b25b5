#!/usr/bin/env bash
# GPU runs, each inside 10 minutes (one device-machine command):
#
#   benchmarks/gpu.sh [evidence]   studies 3 (robustness) and 5 (speed) at 256x256 with a larger model: results in
#                                  benchmarks/results/gpu/ (device named in each JSON), then
#                                  benchmarks/results/RESULTS.md is regenerated
#   benchmarks/gpu.sh coverage     issue 6 on a GPU: models.py for SwinUNETR, UNETR and SamViT at their standard
#                                  sizes (merged into benchmarks/results/models.json), and volume3d.py's
#                                  8x128x128 row (UNet (8,16,32,64), 2 residual units, 4 px tile, 1800 steps)
#                                  into benchmarks/results/volume3d.json
#   benchmarks/gpu.sh --smoke [evidence|coverage]
#                                  CPU dry run of the same at tiny sizes (no GPU needed), results in $OUT_DIR
#                                  (default: a temporary folder), the results folder untouched
#
# Python: $PYTHON if set, else ./.venv/bin/python, else `./run setup` creates .venv (needs the network; keep a
# CUDA torch already installed in .venv: ./run never replaces it). Environment overrides: OUT_DIR, CACHE_DIR.
# Evidence model: MONAI UNet (16, 32, 64, 128, 256), 1.6M parameters; owner model trained 300 steps, embedded
# with the library's default recipe (the key image keeps its mask, KEEP_MASKS_EMBED_STEPS: 3600 steps; the results
# committed before 2026-12-07 used the recipe before it, 1800 steps). Each study runs under a time limit
# that keeps the GPU run inside its 10 minutes (a study past it is stopped and its results are missing); the
# --smoke dry run only checks that the script works, so its limits are loose (a shared CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
STUDY=evidence
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    evidence|coverage) STUDY=$arg ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown option $arg (use [--smoke] [evidence|coverage])" >&2; exit 2 ;;
  esac
done

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
  else
    echo "gpu.sh: no .venv here; setting it up with ./run setup" >&2
    ./run setup
    PYTHON=.venv/bin/python
  fi
fi
"$PYTHON" -c 'import StealthMarkLib' 2>/dev/null || {
  echo "gpu.sh: $PYTHON cannot import StealthMarkLib: run ./run setup (or set PYTHON)" >&2; exit 3; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$SMOKE" = 1 ]; then
  OUT_DIR=${OUT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/stealthmark-gpu-smoke.XXXXXX")}
  CACHE_DIR=${CACHE_DIR:-$OUT_DIR/cache}
  ARGS=(--smoke --device cpu --threads 1 --out-dir "$OUT_DIR" --cache "$CACHE_DIR")
  SPEED_ARGS=()
  LIMIT_ROBUST=900; LIMIT_SPEED=900
  MODEL_ARGS=(--smoke --device cpu --threads 1); VOL_ARGS=(--smoke --device cpu --threads 1)
  LIMIT_ARCH=600; LIMIT_3D=600
  MODELS_OUT=$OUT_DIR/models.json; VOL_OUT=$OUT_DIR/volume3d.json
else
  if ! "$PYTHON" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    built = torch.version.cuda or "none (a CPU-only build)"
    sys.exit(f"gpu.sh: no CUDA GPU visible to torch {torch.__version__} (CUDA build: {built}); "
             "run this on a CUDA machine with a CUDA build of torch, or use --smoke for a CPU dry run")
print(f"CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
EOF
  then exit 3; fi
  OUT_DIR=${OUT_DIR:-benchmarks/results/gpu}
  CACHE_DIR=${CACHE_DIR:-benchmarks/.cache/gpu}
  ARGS=(--device cuda --size 256 --channels 16,32,64,128,256 --samples 1000 --trials 10
        --out-dir "$OUT_DIR" --cache "$CACHE_DIR")
  SPEED_ARGS=(--lime-sizes 128,256 --lime-samples 500,1000,2000 --lime-channels 16,32,64,128,256
              --steps 200 --qe-trials 20)
  LIMIT_ROBUST=330; LIMIT_SPEED=230   # 9 minutes in all, the rest for start-up
  MODEL_ARGS=(--size standard --device cuda)
  VOL_ARGS=(--roi 8,128,128 --channels 8,16,32,64 --res-units 2 --tile 4 --steps 1800 --batch default
            --trials 6 --mode blended --device cuda)
  LIMIT_ARCH=120; LIMIT_3D=160   # coverage: 8.5 minutes in all
  MODELS_OUT=benchmarks/results/models.json; VOL_OUT=benchmarks/results/volume3d.json
fi
mkdir -p "$OUT_DIR" "$CACHE_DIR"

run_study() {  # name, time limit (s), arguments...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc=0
  echo "== $name (limit ${limit}s): $PYTHON benchmarks/$name.py $*"
  timeout "$limit" "$PYTHON" "benchmarks/$name.py" "$@" || rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 124 ] && echo "gpu.sh: $name ran past ${limit}s and was stopped: its results are missing" >&2
  return $rc
}

status=0
if [ "$STUDY" = coverage ]; then
  # one architecture at a time, merged into the file, so that one past its limit loses only its own record
  for arch in SwinUNETR UNETR SamViT; do
    run_study models "$LIMIT_ARCH" --archs "$arch" --merge --out "$MODELS_OUT" "${MODEL_ARGS[@]}" || status=1
  done
  run_study volume3d "$LIMIT_3D" --out "$VOL_OUT" "${VOL_ARGS[@]}" || status=1
  echo "results in $MODELS_OUT and $VOL_OUT (total $SECONDS s)"
  exit $status
fi
run_study robustness "$LIMIT_ROBUST" "${ARGS[@]}" || status=1
run_study speed "$LIMIT_SPEED" "${ARGS[@]}" "${SPEED_ARGS[@]}" || status=1
echo "results in $OUT_DIR (total $SECONDS s)"
if [ "$SMOKE" = 0 ]; then
  "$PYTHON" benchmarks/make_results.py || status=1
fi
exit $status
