#!/usr/bin/env bash
# The CUDA checks of LocallyConnected2d in one call, for a GPU machine without internet (a developer tool):
#   scripts/gpu_check.sh prepare      here, with pip access: the wheels the GPU machine lacks, into .devrun/whl
#   scripts/gpu_check.sh run [SECS]   there, from the repository root (.devrun carried along): the Triton kernel
#                                     tests, `downpour bench layers --json`, then scripts/triton_sweep.py with
#                                     SECS seconds (default 90) of launch-setting sweep; results go to $OUT (or
#                                     ./gpu_out). About 4 minutes on an H100 with SECS=90.
# The GPU machines this project has used had torch 2.11 and Triton 3.6 but not tomli_w (config files).
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    mkdir -p .devrun/whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 -d .devrun/whl tomli_w
    ls .devrun/whl
    ;;
run)
    out="${OUT:-gpu_out}"
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    site=$(mktemp -d "${TMPDIR:-/tmp}/downpour-site.XXXXXX") # private: not a fixed name another user could make first
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .devrun/whl/*.whl || exit 1
    export PYTHONPATH="src:$site"
    start=$(date +%s)
    stamp() { echo "== $1 at $(($(date +%s) - start)) s"; }
    nvidia-smi --query-gpu=name,driver_version,temperature.gpu --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)
assert torch.cuda.is_available(), 'no CUDA device: these checks are for a GPU machine'" || exit 1
    stamp tests
    timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_nn_local_triton.py tests/test_nn_triton_skip.py 2>&1 |
        tee "$out/pytest.txt" |
        tail -4
    echo "tests rc=${PIPESTATUS[0]}"
    stamp "bench layers"
    timeout 150 python3 -m downpour bench layers --json >"$out/bench_layers.json" 2>"$out/bench_layers.err"
    echo "bench rc=$?"
    python3 - "$out/bench_layers.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
for key in ("cuda", "cuda_non_overlapping"):
    print(key, json.dumps({k: v for k, v in result[key].items() if k != "launch_settings"}))
    print("  chose", [(c["kernel"], c["tf32"], c["setting"]) for c in result[key]["launch_settings"]])
for row in result.get("cuda_skip_time", []):  # the variance skip: time saved against the fraction not computed
    print("skip", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
PY
    stamp sweep
    timeout $((${2:-90} + 120)) python3 scripts/triton_sweep.py "$out/triton_sweep.json" --sweep-seconds "${2:-90}" \
        >"$out/sweep.log" 2>&1
    echo "sweep rc=$?"
    grep -v '"kernel"' "$out/sweep.log" | cut -c1-700 | head -60
    stamp done
    ;;
*)
    echo "usage: scripts/gpu_check.sh prepare | run [SWEEP_SECONDS]" >&2
    exit 2
    ;;
esac
