"""PyTorch `.bin` fixtures (torch.save zip + pickle) for the strict loader:

  pytorch_bin/proj.bin      the ProjLayer fixture's weights (fixtures/proj/weights.safetensors) as torch.save
                            writes them — the format of the released qformer/, text_encoder/ and vae/ files
  pytorch_bin/nested.bin    the same under {"model": state_dict} (LAVIS checkpoint_N.pth layout)
  pytorch_bin/evil.bin      a pickle whose loading would call os.system (the reader must refuse it and
                            must not run it)
"""
import os

import torch
from safetensors.torch import load_file

from common import FIXTURES, out_dir

MARKER = "/tmp/blipd-pickle-was-executed"


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def main():
    d = out_dir("pytorch_bin")
    sd = load_file(str(FIXTURES / "proj" / "weights.safetensors"))
    torch.save(sd, d / "proj.bin")
    torch.save({"model": sd, "epoch": 3}, d / "nested.bin")
    torch.save({"dense1.weight": sd["dense1.weight"], "payload": Evil()}, d / "evil.bin")
    if os.path.exists(MARKER):
        os.remove(MARKER)
    for f in sorted(d.iterdir()):
        print(f"{f.name}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
