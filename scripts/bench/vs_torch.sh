#!/usr/bin/env bash
# PyTorch vs blipd on the same machine, the same random weights and the same inputs, in one run.
#
#   scripts/bench/vs_torch.sh infer     # full-size BLIP-Diffusion (1.56 B parameters), 256², 3 PNDM steps + CFG
#   scripts/bench/vs_torch.sh train     # stage-2 step, mid size (414 M trainable), 256², batch 2, fp32 AdamW
#
# The reference side is ../shared/bench/torch_cpu.py (read its header): it writes the pipeline folder in the
# diffusers layout, the initial latents and its images, and times diffusers on them. blipd then loads that very
# folder (`blipd bench infer`) from the same latents and compares its images. scripts/bench/torch_rss.py runs the
# reference generation once more in a fresh process for its peak memory. Ends with one line:
#   infer: PyTorch A s, blipd B s, speed ratio A/B = R
# (A and B exclude loading; both sides use THREADS threads.) For train the line is
#   train: PyTorch A samples/s, blipd B samples/s, speed ratio B/A = R
# (mean of ITERS steps after one warm-up step on each side). Nothing here is a timed test.
#
# Env: THREADS (2), SIZE (256), STEPS (3), BATCH (2), ITERS (3), WORK (target/bench-vs-torch-MODE), SHARED (../shared),
#      PYTHON (default /work/pyref/bin/python if it has diffusers, else a venv at target/bench-torch-venv
#      with scripts/reference/requirements.txt), BLIPD (a blipd binary; default: built here in release),
#      KEEP=1 keeps the work folder (6 GB for infer), REUSE=1 skips rebuilding it when present.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE="${1:?usage: vs_torch.sh infer|train}"
THREADS="${THREADS:-2}" SIZE="${SIZE:-256}" STEPS="${STEPS:-3}" BATCH="${BATCH:-2}" ITERS="${ITERS:-3}"
SHARED="${SHARED:-../shared}"
WORK="${WORK:-target/bench-vs-torch-$MODE}"
TOK=crates/blipd-models/tests/fixtures/tokenizers/tiny_clip
BERT=crates/blipd-models/tests/fixtures/tokenizers/tiny_bert/vocab.txt
IMAGE="${IMAGE:-$SHARED/dreambench/dog/00.jpg}"
[ -f "$SHARED/bench/torch_cpu.py" ] || { echo "$SHARED/bench/torch_cpu.py is absent: no reference to run"; exit 1; }
PY="${PYTHON:-/work/pyref/bin/python}"
if ! "$PY" -c "import diffusers, torch" 2>/dev/null; then
  PY=target/bench-torch-venv/bin/python
  [ -x "$PY" ] || python3 -m venv target/bench-torch-venv
  "$PY" -c "import diffusers, torch" 2>/dev/null || "$PY" -m pip install -q -r scripts/reference/requirements.txt
fi
if [ -z "${BLIPD:-}" ]; then
  cargo build --release -q -p blipd-cli
  BLIPD=target/release/blipd
fi
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS" RAYON_NUM_THREADS="$THREADS"
json() { "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(d$2)" "$1"; }

case "$MODE" in
infer)
  if [ "${REUSE:-0}" = 1 ] && [ -f "$WORK/torch_infer.json" ]; then
    echo "== reusing $WORK (REUSE=1)"
  else
    rm -rf "$WORK"; mkdir -p "$WORK"
    echo "== PyTorch: building the random full-size folder and timing diffusers ($THREADS threads)"
    "$PY" "$SHARED/bench/torch_cpu.py" infer --out "$WORK" --tokenizer "$TOK" --bert-vocab "$BERT" \
      --image "$IMAGE" --size "$SIZE" --steps "$STEPS" --threads "$THREADS"
  fi
  echo "== blipd on the same folder and latents"
  "$BLIPD" bench infer --model "$WORK/pipe" --image "$IMAGE" --subject dog --steps "$STEPS" \
    --latents "$WORK/latents_in.npy" --compare "$WORK/generate_${STEPS}steps.npy" --json "$WORK/blipd_infer.json"
  echo "== PyTorch again in a fresh process (its peak memory, and a second timing)"
  "$PY" scripts/bench/torch_rss.py infer --work "$WORK" --bert-vocab "$BERT" --image "$IMAGE" \
    --steps "$STEPS" --threads "$THREADS" | tee "$WORK/torch_rss.json"
  echo "== blipd again"
  "$BLIPD" bench infer --model "$WORK/pipe" --image "$IMAGE" --subject dog --steps "$STEPS" \
    --latents "$WORK/latents_in.npy" --json "$WORK/blipd_infer2.json" | tail -1
  A1=$(json "$WORK/torch_infer.json" "['generate_${STEPS}steps_s']")
  A2=$(json "$WORK/torch_rss.json" "['generate_s']")
  B1=$(json "$WORK/blipd_infer.json" "['generate_s']")
  B2=$(json "$WORK/blipd_infer2.json" "['generate_s']")
  A=$("$PY" -c "import sys; print((float(sys.argv[1]) + float(sys.argv[2])) / 2)" "$A1" "$A2")
  B=$("$PY" -c "import sys; print((float(sys.argv[1]) + float(sys.argv[2])) / 2)" "$B1" "$B2")
  echo "runs (A B A B): PyTorch $A1 s, blipd $B1 s, PyTorch $A2 s, blipd $B2 s"
  RT=$(json "$WORK/torch_rss.json" "['peak_rss_bytes']/1e9")
  RB=$(json "$WORK/blipd_infer.json" "['peak_rss_bytes']/1e9")
  LT=$(json "$WORK/torch_infer.json" "['load_s']")
  LB=$(json "$WORK/blipd_infer.json" "['load_s']")
  D=$(json "$WORK/blipd_infer.json" "['max_abs_diff']")
  printf 'load: PyTorch %s s, blipd %.2f s; peak RSS: PyTorch %.2f GB, blipd %.2f GB; images max |Δ| %s\n' \
    "$LT" "$LB" "$RT" "$RB" "$D"
  "$PY" -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'infer: PyTorch {a:.2f} s, blipd {b:.2f} s, speed ratio A/B = {a/b:.2f} (means of two interleaved runs each)')" "$A" "$B"
  ;;
train)
  if [ "${REUSE:-0}" = 1 ] && [ -f "$WORK/torch_train.json" ]; then
    echo "== reusing $WORK (REUSE=1)"
  else
    rm -rf "$WORK"; mkdir -p "$WORK"
    echo "== PyTorch: building the random mid-size folder and timing the stage-2 step ($THREADS threads)"
    "$PY" "$SHARED/bench/torch_cpu.py" train --out "$WORK" --tokenizer "$TOK" --bert-vocab "$BERT" \
      --size "$SIZE" --batch "$BATCH" --iters "$ITERS" --threads "$THREADS"
  fi
  echo "== blipd on the same folder"
  "$BLIPD" bench train --model "$WORK/pipe" --bert-vocab "$BERT" --size "$SIZE" --batch "$BATCH" \
    --iters "$ITERS" --json "$WORK/blipd_train.json"
  echo "== PyTorch again in a fresh process (its peak memory, and a second timing)"
  "$PY" scripts/bench/torch_rss.py train --work "$WORK" --bert-vocab "$BERT" --tokenizer "$TOK" --size "$SIZE" \
    --batch "$BATCH" --iters "$ITERS" --threads "$THREADS" | tee "$WORK/torch_rss_train.json"
  echo "== blipd again"
  "$BLIPD" bench train --model "$WORK/pipe" --bert-vocab "$BERT" --size "$SIZE" --batch "$BATCH" \
    --iters "$ITERS" --json "$WORK/blipd_train2.json" | tail -1
  A1=$(json "$WORK/torch_train.json" "['samples_per_s']")
  A2=$(json "$WORK/torch_rss_train.json" "['samples_per_s']")
  B1=$(json "$WORK/blipd_train.json" "['samples_per_s']")
  B2=$(json "$WORK/blipd_train2.json" "['samples_per_s']")
  echo "runs (A B A B), samples/s: PyTorch $A1, blipd $B1, PyTorch $A2, blipd $B2"
  RT=$(json "$WORK/torch_rss_train.json" "['peak_rss_bytes']/1e9")
  RB=$(json "$WORK/blipd_train.json" "['peak_rss_bytes']/1e9")
  printf 'peak RSS: PyTorch %.2f GB, blipd %.2f GB\n' "$RT" "$RB"
  "$PY" -c "import sys; a=(float(sys.argv[1])+float(sys.argv[2]))/2; b=(float(sys.argv[3])+float(sys.argv[4]))/2; print(f'train: PyTorch {a:.4f} samples/s, blipd {b:.4f} samples/s, speed ratio B/A = {b/a:.2f} (means of two interleaved runs each)')" "$A1" "$A2" "$B1" "$B2"
  ;;
*) echo "unknown mode $MODE (infer|train)"; exit 2;;
esac
[ "${KEEP:-0}" = 1 ] || [ "${REUSE:-0}" = 1 ] || rm -rf "$WORK/pipe"
