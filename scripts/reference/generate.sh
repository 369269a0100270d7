#!/usr/bin/env bash
# Regenerate the parity fixtures (crates/blipd-models/tests/fixtures/, and the stage-1 loss and CLIPSeg mask
# fixtures of blipd-stage1 and blipd-apps; docs/parity.md lists each).
#   scripts/reference/generate.sh            # all generators
#   scripts/reference/generate.sh unet vae   # some
# Creates a venv (default .venv-ref in the repo root, override with BLIPD_REF_VENV) with the pinned stack.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${BLIPD_REF_VENV:-$root/.venv-ref}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$here/requirements.txt"
fi
if [ $# -eq 0 ]; then
  # `pipeline` first: the fine-tuning, stage-2 loss, edit, ControlNet- and DDIM-pipeline generators read its
  # folder; `unet` before `lora`, which adapts its U-Net.
  set -- pipeline unet $(cd "$here" && ls gen_*.py | sed 's/^gen_//; s/\.py$//' | grep -vx pipeline | grep -vx unet)
fi
for g in "$@"; do
  echo "== $g"
  (cd "$here" && "$venv/bin/python" "gen_$g.py")
done
