#!/usr/bin/env bash
# Every check that needs a GPU, in one run (the device tool lends one GPU for minutes: build here, carry the
# binaries, run this once, read $OUT). Nothing here has run on a GPU yet; DRY=1 checks the script itself on
# the CPU with the tiny preset.
#
# Build on the CPU machine (no CUDA toolkit needed; CUDA, NVRTC and NCCL load at run time):
#   cargo build --release -p blipd-cli --features nccl
#   cargo build --release -p blipd-dist --features nccl --example nccl_bandwidth
#   mkdir -p dist-bin/wheels && cp target/release/blipd target/release/examples/nccl_bandwidth dist-bin/
#   strip dist-bin/blipd dist-bin/nccl_bandwidth && cp ../shared/bench/torch_{baseline,finetune}.py dist-bin/
#   pip download --no-deps diffusers==0.42.1 importlib_metadata -d dist-bin/wheels
# For CLIPSEG=1 (CLIPSeg and the synthesis chain on the device, issue 15) also carry transformers 4.44.2 and
# the dependencies the host's PyTorch lacks, as wheels for its Python (abi3 wheels where they exist):
#   pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.10 \
#     transformers==4.44.2 tokenizers==0.19.1 safetensors huggingface_hub regex -d dist-bin/wheels
# (dist-bin/ is git-ignored.) Then, with the device tool: carry ["dist-bin"], run
#   bash scripts/device/gpu_checks.sh          (CLIPSEG=1 adds the CLIPSeg block, CLIPSEG=only runs it alone)
# Outputs under $OUT: summary.txt (the figures), nvidia-smi.txt, nccl_bw.json, nccl_stage2.{out,err},
# bench_b<B>.{out,err}, bench_bf16_b<B>.{out,err}, torch_baseline.log, baseline.json; with CLIPSEG, clipseg.log and
# synth_chain.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu-checks}"
BIN="${BIN:-dist-bin}"
DRY="${DRY:-0}"
BATCHES="${BATCHES:-1 8 16}"
mkdir -p "$OUT"
: > "$OUT/summary.txt"
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
mean_rate() { # mean samples/s of a run's steps after the first two (warm-up, kernel compilation)
  python3 -c '
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
r = [x for x in r if "samples_per_s" in x]
t = r[2:] or r
print("%.3f samples/s over %d steps, last loss %.4f" % (sum(x["samples_per_s"] for x in t) / len(t), len(t), r[-1]["loss"]) if r else "no metrics")' "$1"
}

say "== device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

# 0. CLIPSEG=1 or only: CLIPSeg masks on the device, transformers (DEVICE=cuda) against the CUDA build on the
# same random-weight rd64-refined-size model and 64 photos (scripts/bench/clipseg.sh: both wall times, the
# ratio, the masks' max |Δ|), then the synthesis chain on those photos with this machine's cores
# (scripts/bench/synth_chain.sh: each stage's share, pairs/s per GPU). The model (600 MB) stays outside $OUT.
if [ "${CLIPSEG:-0}" != 0 ]; then
  [ "$DRY" != 1 ] && python3 -m pip install -q --no-deps "$BIN"/wheels/*.whl > "$OUT/pip_clipseg.log" 2>&1
  CW="${CLIPSEG_WORK:-/tmp/blipd-clipseg}"
  dev=cuda; [ "$DRY" = 1 ] && dev=cpu
  DEVICE=$dev PYTHON="${PYTHON:-python3}" BLIPD="$BIN/blipd" WORK="$CW" timeout 300 bash scripts/bench/clipseg.sh "${CLIPSEG_N:-64}" \
    > "$OUT/clipseg.log" 2>&1
  say "== CLIPSeg, transformers ($dev) vs blipd (rc $?): $(grep -aE '^(transformers:|==.*photos|masks:)' "$OUT/clipseg.log" | tr '\n' ' ')"
  PYTHON="${PYTHON:-python3}" BLIPD="$BIN/blipd" BENCH="$CW" WORK=/tmp/blipd-chain timeout 200 bash scripts/bench/synth_chain.sh \
    > "$OUT/synth_chain.log" 2>&1
  say "== synthesis chain with CLIPSeg on the device (rc $?): $(tail -4 "$OUT/synth_chain.log" | tr '\n' ' ')"
  if [ "$CLIPSEG" = only ]; then say "== done"; exit 0; fi
fi

one_rank=(env RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29571)
if [ "$DRY" != 1 ]; then
  # 1. NCCL all-reduce of 1 GiB vs a device-to-device copy (world size 1: NCCL's intra-device path).
  timeout 150 "${one_rank[@]}" "$BIN/nccl_bandwidth" > "$OUT/nccl_bw.json" 2> "$OUT/nccl_bw.err"
  say "== nccl bandwidth (rc $?): $(cat "$OUT/nccl_bw.json") $(tail -2 "$OUT/nccl_bw.err")"
  TRANSPORT=nccl
else
  TRANSPORT=tcp
fi

# 2. A world-size-1 data-parallel stage-2 run through DistSync with the NCCL transport (tiny networks).
rm -rf "$OUT/nccl_stage2"
timeout 200 "${one_rank[@]}" BLIPD_GRAD_TRANSPORT=$TRANSPORT BLIPD_LOG=info "$BIN/blipd" pretrain \
  --config configs/stage2/tiny.toml --set "dir=$OUT/nccl_stage2" --set stage2.train.max_steps=5 \
  --set stage2.sample.every=0 --set stage2.sample.at_end=false --set stage2.checkpoint.every=0 \
  > "$OUT/nccl_stage2.out" 2> "$OUT/nccl_stage2.err"
rc=$?
say "== world-size-1 $TRANSPORT stage-2 run (rc $rc): $(mean_rate "$OUT/nccl_stage2/metrics.jsonl" 2>&1); \
$(grep -o 'gradient sync ([A-Za-z]*): .*' "$OUT/nccl_stage2.err" | head -1)"

# 3. Full-size stage-2 training throughput (random SD-1.5-sized networks, fp32 on burn-cuda).
for b in $BATCHES; do
  rm -rf "$OUT/bench_b$b"
  cfg=configs/stage2/bench-sd15.toml
  extra=()
  [ "$DRY" = 1 ] && extra=(--set stage2.stage.preset=\"tiny\" --set stage2.data.target_size=32 --set stage2.train.max_steps=5)
  timeout 240 "$BIN/blipd" pretrain --config "$cfg" --set "dir=$OUT/bench_b$b" \
    --set "stage2.train.batch_size=$b" "${extra[@]}" > "$OUT/bench_b$b.out" 2> "$OUT/bench_b$b.err"
  rc=$?
  say "== blipd stage-2 train, batch $b (rc $rc): $(mean_rate "$OUT/bench_b$b/metrics.jsonl" 2>&1) \
$(grep -m1 -iE 'error|panick|out of memory' "$OUT/bench_b$b.err" | cut -c1-300)"
done

# 3b. The same with `[train] mixed_precision = "bf16"` (matrix products in bf16, f32 master weights).
# Not in DRY mode: the CPU build's ndarray backend has no bf16 (the CPU tests use burn-flex instead).
if [ "$DRY" != 1 ]; then
  for b in ${BF16_BATCHES:-8 16}; do
    rm -rf "$OUT/bench_bf16_b$b"
    timeout 240 "$BIN/blipd" pretrain --config configs/stage2/bench-sd15.toml --set "dir=$OUT/bench_bf16_b$b" \
      --set "stage2.train.batch_size=$b" --set 'stage2.train.mixed_precision="bf16"' \
      > "$OUT/bench_bf16_b$b.out" 2> "$OUT/bench_bf16_b$b.err"
    rc=$?
    say "== blipd stage-2 train bf16, batch $b (rc $rc): $(mean_rate "$OUT/bench_bf16_b$b/metrics.jsonl" 2>&1) \
$(grep -m1 -iE 'error|panick|out of memory' "$OUT/bench_bf16_b$b.err" | cut -c1-300)"
  done
fi

# 3c. FINETUNE=1: subject fine-tuning at full size against ../shared/bench/torch_finetune.py (80 steps, batch 3,
# bf16): a random full-size pipeline is exported by a 1-step stage-2 run, then fine-tuned on three photos.
if [ "${FINETUNE:-0}" = 1 ] && [ "$DRY" != 1 ]; then
  rm -rf "$OUT/ft_base" "$OUT/ft_run" "$OUT/ft_photos"; mkdir -p "$OUT/ft_photos"
  python3 -c 'import sys, numpy as np; from PIL import Image
for i in range(3): Image.fromarray((np.random.default_rng(i).random((512, 512, 3)) * 255).astype("uint8")).save(f"{sys.argv[1]}/{i}.png")' "$OUT/ft_photos"
  timeout 240 "$BIN/blipd" pretrain --config configs/stage2/bench-sd15.toml --set "dir=$OUT/ft_base" \
    --set stage2.train.max_steps=1 --set stage2.stage.export=true > "$OUT/ft_base.out" 2> "$OUT/ft_base.err"
  timeout 240 "$BIN/blipd" finetune --config configs/finetune/dreambench-dog.toml --run-dir "$OUT/ft_run" \
    --set "stage.model_dir=\"$OUT/ft_base/export\"" --set "data.images=\"$OUT/ft_photos\"" \
    --set train.max_steps=83 --set 'train.mixed_precision="bf16"' --set checkpoint.every=0 \
    --set checkpoint.at_end=false --set sample.every=0 --set sample.at_end=false \
    > "$OUT/ft_run.out" 2> "$OUT/ft_run.err"
  rc=$?
  say "== blipd fine-tuning 83 steps, batch 3, bf16 (rc $rc): $(mean_rate "$OUT/ft_run/metrics.jsonl" 2>&1) \
$(grep -m1 -iE 'error|panick|out of memory' "$OUT/ft_run.err" | cut -c1-300)"
fi

# 4. The PyTorch reference in the same run, on the same card.
if [ "$DRY" != 1 ]; then
  python3 -m pip install -q --no-deps "$BIN"/wheels/*.whl > "$OUT/pip.log" 2>&1
  OUT="$OUT" timeout 240 python3 "$BIN/torch_baseline.py" > "$OUT/torch_baseline.log" 2>&1
  say "== torch baseline (rc $?): $(grep -E 'train_b(1|8|16)' "$OUT/torch_baseline.log" | tr '\n' ' ')"
  if [ "${FINETUNE:-0}" = 1 ] && [ -f "$BIN/torch_finetune.py" ]; then
    OUT="$OUT" timeout 240 python3 "$BIN/torch_finetune.py" > "$OUT/torch_finetune.log" 2>&1
    say "== torch fine-tuning (rc $?): $(tr '\n' ' ' < "$OUT/torch_finetune.log" | cut -c1-400)"
  fi
fi
say "== done"
