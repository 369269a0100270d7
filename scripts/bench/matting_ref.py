"""pymatting side of scripts/bench/matting.sh (prepare inputs, time pymatting, compare with blipd).

prepare DIR SIZE IMG...  : writes DIR/<name>.png (bicubic-resized to SIZE²) and DIR/<name>_trimap.png.
    Trimap recipe (a crude mask, as a coarse CLIPSeg mask would give):
      1. t0 = ellipse trimap (pixel centre (u,v); d = sqrt(((u-.5)/.32)^2 + ((v-.55)/.42)^2); fg d<.85, bg d>1.15);
      2. a0 = pymatting.estimate_alpha_cf(image, t0); mask = a0 > 0.5;
      3. fg = mask eroded by a disk of radius SIZE/32, bg = complement of mask dilated by the same disk,
         everything else unknown (stored as 128).
time DIR REPEAT FG_REPEAT : times estimate_alpha_cf (best CPU time of REPEAT) and estimate_foreground_ml (of FG_REPEAT),
    saves .npy results.
compare DIR PY_LOG RS_LOG [SUFFIX] : mean |Δα| (whole image and unknown region), max |Δα|, mean |ΔF| where α>0.01, speed ratios.
"""
import os, sys, time, glob
import numpy as np
from PIL import Image

def ellipse_trimap(S):
    y, x = np.mgrid[0:S, 0:S]
    u = (x + 0.5) / S; v = (y + 0.5) / S
    d = np.sqrt(((u - 0.5) / 0.32) ** 2 + ((v - 0.55) / 0.42) ** 2)
    t = np.full((S, S), 0.5); t[d < 0.85] = 1.0; t[d > 1.15] = 0.0
    return t

def disk(r):
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r

def load(path, mode):
    return np.asarray(Image.open(path).convert(mode), dtype=np.float64) / 255.0

def prepare(d, S, images):
    from scipy import ndimage
    from pymatting import estimate_alpha_cf
    os.makedirs(d, exist_ok=True)
    for path in images:
        name = path.rstrip("/").split("/")[-2] + "_" + os.path.splitext(os.path.basename(path))[0]
        im = Image.open(path).convert("RGB").resize((S, S), Image.BICUBIC)
        im.save(f"{d}/{name}.png")
        img = np.asarray(im, dtype=np.float64) / 255.0
        mask = estimate_alpha_cf(img, ellipse_trimap(S)) > 0.5
        r = max(1, S // 32)
        fg = ndimage.binary_erosion(mask, disk(r)); bg = ~ndimage.binary_dilation(mask, disk(r))
        t = np.full((S, S), 128, np.uint8); t[fg] = 255; t[bg] = 0
        Image.fromarray(t).save(f"{d}/{name}_trimap.png")

def names(d):
    return sorted(p[len(d) + 1:-len("_trimap.png")] for p in glob.glob(f"{d}/*_trimap.png"))

def time_ref(d, repeat, fg_repeat):
    from pymatting import estimate_alpha_cf, estimate_foreground_ml
    # One untimed pass over every image first (numba's compilation and first-touch memory), as blipd's bench.
    for n in names(d):
        img = load(f"{d}/{n}.png", "RGB"); tri = load(f"{d}/{n}_trimap.png", "L")
        estimate_foreground_ml(img, estimate_alpha_cf(img, tri))
    for n in names(d):
        img = load(f"{d}/{n}.png", "RGB"); tri = load(f"{d}/{n}_trimap.png", "L")
        best_cf = best_fg = 1e9
        for _ in range(repeat):
            t0 = time.process_time(); a = estimate_alpha_cf(img, tri); best_cf = min(best_cf, time.process_time() - t0)
        # The foreground takes milliseconds: its best of fg_repeat (both sides alike) is steadier than of repeat.
        for _ in range(max(1, fg_repeat)):
            t0 = time.process_time(); f = estimate_foreground_ml(img, a); best_fg = min(best_fg, time.process_time() - t0)
        np.save(f"{d}/{n}_alpha_py.npy", a); np.save(f"{d}/{n}_fg_py.npy", f)
        print(f"PY {n} cf_s {best_cf:.4f} fg_s {best_fg:.4f} unknown {int(((tri > 0.1) & (tri < 0.9)).sum())}", flush=True)

def compare(d, py_log, rs_log, suffix=""):
    def parse(path, tag):
        out = {}
        for line in open(path):
            p = line.split()
            if p and p[0] == tag:
                out[p[1]] = dict(zip(p[2::2], p[3::2]))
        return out
    py, rs = parse(py_log, "PY"), parse(rs_log, "RS")
    tol = next((l.split()[1] for l in open(rs_log) if l.startswith("RS_TOLERANCE")), "?")
    simd = next((l.split()[1] for l in open(rs_log) if l.startswith("RS_SIMD")), "?")
    tot_py = tot_rs = tot_pyf = tot_rsf = 0.0
    errs = []
    print(f"blipd stopping criterion: ||b - A x||_2 <= {tol} ||b||_2 (pymatting: 1e-7, same norm)")
    print(f"{'image':28s} {'py cf s':>8s} {'rs cf s':>8s} {'ratio':>6s} {'mean|da|':>9s} {'unk mean':>9s} {'max|da|':>8s} {'fg ratio':>8s} {'mean|dF|':>8s} {'it':>4s} {'rel res':>8s}")
    for n in names(d):
        a_py = np.load(f"{d}/{n}_alpha_py.npy")
        a_rs = np.asarray(Image.open(f"{d}/{n}_alpha_rs{suffix}.png"), dtype=np.float64) / 65535.0
        tri = load(f"{d}/{n}_trimap.png", "L"); unk = (tri > 0.1) & (tri < 0.9)
        da = np.abs(a_py - a_rs)
        f_py = np.load(f"{d}/{n}_fg_py.npy")
        f_rs = np.asarray(Image.open(f"{d}/{n}_fg_rs{suffix}.png"), dtype=np.float64) / 255.0
        sel = a_py > 0.01
        dF = np.abs(f_py - f_rs)[sel].mean()
        cp, cr = float(py[n]["cf_s"]), float(rs[n]["cf_s"]); fp, fr = float(py[n]["fg_s"]), float(rs[n]["fg_s"])
        tot_py += cp; tot_rs += cr; tot_pyf += fp; tot_rsf += fr
        errs.append(da.mean())
        print(f"{n:28s} {cp:8.3f} {cr:8.3f} {cp / cr:6.1f} {da.mean():9.5f} {da[unk].mean():9.5f} {da.max():8.4f} {fp / fr:8.1f} {dF:8.5f} {rs[n]['it']:>4s} {rs[n]['rel']:>8s}")
    print(f"TOTAL single-thread closed-form (blipd tolerance {tol}, {simd}): pymatting {tot_py:.3f} s, blipd {tot_rs:.3f} s, speed ratio {tot_py / tot_rs:.1f}x; "
          f"foreground: {tot_pyf:.3f} s vs {tot_rsf:.3f} s ({tot_pyf / tot_rsf:.1f}x); worst mean|da| {max(errs):.5f}")
    for line in open(rs_log):
        if line.startswith("RS_ALLCORE"):
            p = line.split(); wall = float(p[p.index("wall_s") + 1])
            print(f"ALL-CORE blipd (alpha+fg, rayon across images, {p[p.index('threads') + 1]} threads): {wall:.3f} s wall "
                  f"for {p[2]} images; ratio vs pymatting single-thread alpha+fg CPU: {(tot_py + tot_pyf) / wall:.1f}x")

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "prepare":
        prepare(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    elif cmd == "time":
        time_ref(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "compare":
        compare(sys.argv[2], sys.argv[3], sys.argv[4], *sys.argv[5:6])

def fixture(out, S, images):
    """Writes parity fixtures for data-pipeline/tests: <name>.png, <name>_trimap.png (same recipe as prepare),
    <name>_alpha.png (pymatting α, 16-bit grey) and <name>_fg.png (pymatting F from that α, 16-bit grey of width 3·S holding interleaved RGB)."""
    from pymatting import estimate_alpha_cf, estimate_foreground_ml
    prepare(out, S, images)
    for n in names(out):
        img = load(f"{out}/{n}.png", "RGB"); tri = load(f"{out}/{n}_trimap.png", "L")
        a = estimate_alpha_cf(img, tri)
        a16 = np.round(np.clip(a, 0, 1) * 65535).astype(np.uint16)
        Image.fromarray(a16).save(f"{out}/{n}_alpha.png")
        # F is estimated from the *quantised* α the test will read, so both sides see the same input.
        f = estimate_foreground_ml(img, a16.astype(np.float64) / 65535.0)
        f16 = np.round(np.clip(f, 0, 1) * 65535).astype(np.uint16).reshape(S, S * 3)
        Image.fromarray(f16).save(f"{out}/{n}_fg.png")

if __name__ == "__main__" and sys.argv[1] == "fixture":
    fixture(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
