#!/usr/bin/env bash
# CLIPSeg masks, side by side on the CPU: transformers' CLIPSegForImageSegmentation and `blipd data masks
# --source clipseg` on the same random-weight model at the real rd64-refined size (150.7 M parameters) and the
# same photos, batch 8, in one run; each does the whole job (read, preprocess, model, sigmoid, resize to the
# photo, 16-bit PNG). Prints both wall times, the ratio and how far the masks are apart.
#
# Usage: scripts/bench/clipseg.sh [N] [WxH]      (defaults: 16 photos of 640x480)
# Env: PYTHON (default /work/pyref/bin/python: torch + transformers 4.44.2), WORK (default
#      target/bench-clipseg), BATCH (default 8), BLIPD (default target/release/blipd, built if absent),
#      DEVICE (transformers' device, default cpu; `cuda` with a `--features cuda` BLIPD compares the GPU builds,
#      as scripts/device/gpu_checks.sh does with CLIPSEG=1).
set -euo pipefail
cd "$(dirname "$0")/../.."
N="${1:-16}"; SIZE="${2:-640x480}"
PY="${PYTHON:-/work/pyref/bin/python}"
WORK="${WORK:-target/bench-clipseg}"
BATCH="${BATCH:-8}"
BLIPD="${BLIPD:-target/release/blipd}"
[ -x "$BLIPD" ] || cargo build -q --release -p blipd-cli
if [ ! -f "$WORK/subjects.csv" ]; then
  rm -rf "$WORK"; mkdir -p "$WORK"
  "$PY" scripts/bench/clipseg_ref.py prepare "$WORK" "$N" "$SIZE"
fi
rm -rf "$WORK/torch_masks" "$WORK/blipd_masks"
echo "== transformers $("$PY" -c 'import transformers; print(transformers.__version__)'), torch $("$PY" -c 'import torch; print(torch.__version__)')"
TORCH=$("$PY" scripts/bench/clipseg_ref.py time "$WORK" "$BATCH" | tee /dev/stderr | sed -n 's/^RESULT torch_s=\([0-9.]*\).*/\1/p')
echo "== blipd ($BLIPD)"
"$BLIPD" data masks --source clipseg --from "$WORK/model" --images "$WORK/images" \
  --subjects "$WORK/subjects.csv" --out "$WORK/blipd_masks" --batch-size "$BATCH" | tee "$WORK/blipd.log"
# blipd's own timing of the job (after the model is loaded, like the transformers side): "…; X s = …".
BLIPD_S=$(sed -n 's/.* rows; \([0-9.]*\) s = .*/\1/p' "$WORK/blipd.log")
"$PY" scripts/bench/clipseg_ref.py compare "$WORK"
printf "== %s photos of %s, batch %s, model loaded: transformers %.2f s, blipd %.2f s → blipd at %.2f× transformers' speed\n" \
  "$N" "$SIZE" "$BATCH" "$TORCH" "$BLIPD_S" "$(echo "$TORCH / $BLIPD_S" | bc -l)"
