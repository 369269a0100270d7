#!/usr/bin/env bash
# Closed-form matting + foreground estimation: pymatting (single-threaded) vs blipd-data, same inputs, one run.
# Prints per-image CPU seconds, the speed ratio, mean |Δα| (whole image and unknown region), CG iterations and
# the final relative residual, once at pymatting's stopping criterion (rtol 1e-7, the headline figure) and once
# at blipd's default tolerance.
#
# Usage: scripts/bench/matting.sh [SIZE] [IMAGES...]
#   SIZE defaults to 512; IMAGES default to six DreamBench photos under ../shared/dreambench.
# Env: PYTHON (default /work/pyref/bin/python if it has pymatting, else a venv at target/bench-venv with
#      `pip install pymatting`), REPEAT (default 3; the α solves per image, best CPU time counted), FG_REPEAT
#      (default 10, the foreground estimates per image: a few milliseconds each, so a best of 3 still caught
#      scheduling noise; both sides alike), WORK (default target/bench-matting-SIZE),
#      TOLERANCE (blipd's tolerance in the first comparison, default 1e-7 = pymatting's rtol).
#      BLIPD_SIMD (generic, avx2 or avx512: caps blipd's instruction-set level, to time the AVX2 build on an
#      AVX-512 machine; the TOTAL lines name the level that ran).
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE="${1:-512}"; shift || true
DREAM="${DREAMBENCH:-../shared/dreambench}"
if [ "$#" -gt 0 ]; then IMAGES=("$@"); else
  [ -d "$DREAM" ] || { echo "no images given and $DREAM is absent"; exit 1; }
  IMAGES=("$DREAM"/dog/00.jpg "$DREAM"/teapot/00.jpg "$DREAM"/backpack/00.jpg "$DREAM"/cat/00.jpg "$DREAM"/vase/00.jpg "$DREAM"/clock/00.jpg)
fi
REPEAT="${REPEAT:-3}"
FG_REPEAT="${FG_REPEAT:-10}"
WORK="${WORK:-target/bench-matting-$SIZE}"
PY="${PYTHON:-/work/pyref/bin/python}"
if ! "$PY" -c "import pymatting" 2>/dev/null; then
  PY=target/bench-venv/bin/python
  [ -x "$PY" ] || python3 -m venv target/bench-venv
  "$PY" -c "import pymatting" 2>/dev/null || "$PY" -m pip install -q pymatting pillow
fi
export NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
rm -rf "$WORK"; mkdir -p "$WORK"
echo "== preparing ${#IMAGES[@]} images at ${SIZE}² in $WORK"
"$PY" scripts/bench/matting_ref.py prepare "$WORK" "$SIZE" "${IMAGES[@]}"
echo "== pymatting $("$PY" -c 'import pymatting; print(pymatting.__version__)') (NUMBA_NUM_THREADS=1, one untimed pass, then the best CPU time of $REPEAT, foreground of $FG_REPEAT)"
"$PY" scripts/bench/matting_ref.py time "$WORK" "$REPEAT" "$FG_REPEAT" | tee "$WORK/py.log"
# The release profile (opt-level 3, no overflow checks or debug assertions, one codegen unit for blipd-data):
# how the pipeline is meant to run (`cargo run --release -- data synth …`). The dev profile also builds
# blipd-data at opt-level 3 but keeps overflow checks, about 6 % slower.
cargo build -q --release -p blipd-data --example matting_bench
BENCH="${CARGO_TARGET_DIR:-target}/release/examples/matting_bench"
# 1. pymatting's stopping criterion: ||b - A x||_2 <= 1e-7 ||b||_2 on the f64 system (TOLERANCE overrides).
echo "== blipd-data at pymatting's stopping criterion (release profile)"
"$BENCH" "$WORK" --repeat "$REPEAT" --fg-repeat "$FG_REPEAT" --tolerance "${TOLERANCE:-1e-7}" | tee "$WORK/rs.log"
# 2. blipd's default tolerance (CfOptions::default(), looser than pymatting's: not an equal-criterion comparison).
echo "== blipd-data at its default tolerance"
"$BENCH" "$WORK" --repeat "$REPEAT" --fg-repeat "$FG_REPEAT" --suffix _default | tee "$WORK/rs_default.log"
echo "== comparison at pymatting's criterion"
"$PY" scripts/bench/matting_ref.py compare "$WORK" "$WORK/py.log" "$WORK/rs.log"
echo "== comparison at blipd's default tolerance"
"$PY" scripts/bench/matting_ref.py compare "$WORK" "$WORK/py.log" "$WORK/rs_default.log" _default
