#!/usr/bin/env bash
# The data pipeline end to end on one machine, stage by stage: `blipd data masks --source clipseg` (the
# rd64-refined-size random-weight model and the 16 photos of scripts/bench/clipseg.sh) then `blipd data synth`
# (trimap → matting → foreground → composite → shards) on the same photos; prints each stage's time, its
# share and pairs/s (and per core). The synthesis uses ellipse masks in the subject boxes: a random-weight
# CLIPSeg's maps are not subject-shaped, so no trimap would survive them; the CLIPSeg stage costs the same
# either way.
#
# Usage: scripts/bench/synth_chain.sh   (run scripts/bench/clipseg.sh first: it makes the model and photos)
# Env: BENCH (default target/bench-clipseg), WORK (default target/bench-synth-chain), PYTHON, BATCH (8),
#      BLIPD (a built binary, e.g. the CUDA build on the GPU machine; default: target/release/blipd, built).
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH="${BENCH:-target/bench-clipseg}"
WORK="${WORK:-target/bench-synth-chain}"
PY="${PYTHON:-/work/pyref/bin/python}"
BATCH="${BATCH:-8}"
[ -d "$BENCH/model" ] && [ -d "$BENCH/images" ] || { echo "no $BENCH/{model,images}: run scripts/bench/clipseg.sh first"; exit 1; }
BIN="${BLIPD:-target/release/blipd}"
[ -n "${BLIPD:-}" ] || cargo build -q --release -p blipd-cli
rm -rf "$WORK"; mkdir -p "$WORK"
N=$(ls "$BENCH/images" | wc -l)
CORES=$(nproc)
echo "== $N photos, $CORES cores"

t0=$(date +%s.%N)
BLIPD_LOG=warn "$BIN" data masks --source clipseg --from "$BENCH/model" --images "$BENCH/images" \
  --subjects "$BENCH/subjects.csv" --out "$WORK/masks_clipseg" --batch-size "$BATCH" | tail -1
t1=$(date +%s.%N)

"$PY" - "$BENCH" "$WORK/masks" <<'PYEOF'
import csv, os, sys
from PIL import Image, ImageDraw
bench, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
for r in csv.DictReader(open(os.path.join(bench, "subjects.csv"))):
    w, h = Image.open(os.path.join(bench, "images", r["ImageID"] + ".png")).size
    m = Image.new("L", (w, h), 0)
    b = [float(r[k]) for k in ("XMin", "YMin", "XMax", "YMax")]
    ImageDraw.Draw(m).ellipse([b[0] * w, b[1] * h, b[2] * w, b[3] * h], fill=255)
    m.save(os.path.join(out, r["ImageID"] + ".png"))
PYEOF

t2=$(date +%s.%N)
BLIPD_LOG=warn "$BIN" data synth --config configs/data/pipeline.toml --subjects "$BENCH/subjects.csv" \
  --images "$BENCH/images" --masks "$WORK/masks" --mask-source dir --backgrounds "$BENCH/images" \
  --out "$WORK/pairs" | grep -E "pairs in total|bad inputs" || true
t3=$(date +%s.%N)

"$PY" - "$t0" "$t1" "$t2" "$t3" "$N" "$CORES" <<'PYEOF'
import sys
t0, t1, t2, t3 = map(float, sys.argv[1:5]); n, cores = int(sys.argv[5]), int(sys.argv[6])
masks, synth = t1 - t0, t3 - t2
total = masks + synth
print(f"clipseg masks  {masks:7.2f} s  {masks / n:6.3f} s/image  {100 * masks / total:5.1f} %")
print(f"synth          {synth:7.2f} s  {synth / n:6.3f} s/pair   {100 * synth / total:5.1f} %")
print(f"chain          {total:7.2f} s  {n / total:6.3f} pairs/s = {n / total / cores:.3f} pairs/s per core")
PYEOF
