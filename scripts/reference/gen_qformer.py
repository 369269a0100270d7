"""Tiny random BLIP-Diffusion Q-Former → tests/fixtures/qformer.

Two references, sharing one set of random weights:

1. diffusers 0.33.1 `pipelines.blip_diffusion.modeling_blip2.Blip2QFormerModel` (the `qformer/` component of
   Salesforce/blipdiffusion): ViT (`visual_encoder`, post_layernorm = ln_vision) + BERT Q-Former + ProjLayer,
   run as the pipeline runs it (`return_dict=False` → proj_layer(last_hidden[:, :Q])). Its constructor loads a
   BERT tokenizer by name; we point `config.tokenizer` at a folder with a tiny `vocab.txt` (written next to
   the fixture) so it builds offline, and the `[DEC]` bos token lands at id len(vocab).
2. LAVIS's own `lavis/models/blip2_models/Qformer.py` (`BertLMHeadModel`: BERT with query tokens, LM head tied
   to the word embeddings), imported by file path from the PyPI wheel salesforce-lavis==1.0.2
   (downloaded with `pip download --no-deps`; it imports fine with transformers 4.44.2). It gives the
   stage-1 attention modes: unimodal query pass (with cached self-attention K/V), unimodal text pass,
   bidirectional ITM pass, and ITG (causal text over the query prefix), both with the cached query K/V
   (as `Blip2Qformer.forward` does) and by recomputing the queries (UniLM mask, `query_embeds` given).
   Stage-1 heads (`vision_proj`, `text_proj`, `itm_head`, `temp`) are plain nn.Linear / scalar, as in
   `Blip2Qformer`, and the features/similarities follow `Blip2Qformer.forward` (no cross-GPU gather).

Tiny sizes: ViT hidden 24 (MLP 96 = 4× as LAVIS hard-codes, 4 heads, 2 layers, 28×28 image, patch 7 → 17 tokens, quick_gelu, eps 1e-6);
Q-Former hidden 32, 3 layers, 4 heads, FFN 48, cross_attention_frequency 2 (layers 0 and 2 cross-attend, so
the no-cross-attention query path is exercised too), 4 query tokens, max positions 16, embed_dim 8.

Files:
  config.json                 Blip2Config.to_dict() (what diffusers writes to qformer/config.json)
  vocab.txt                   the tiny BERT vocabulary ([DEC] is added on top of it)
  weights.safetensors         diffusers Blip2QFormerModel state dict (incl. the `embeddings.position_ids` buffer)
  weights_lavis.safetensors   the same weights in the LAVIS `BlipDiffusion` layout (`blip.visual_encoder.*`
                              in CLIP-ViT names, `blip.ln_vision`, `blip.query_tokens`, `blip.Qformer.bert.*`,
                              `blip.Qformer.cls.*` incl. the tied `decoder.weight`/`decoder.bias` duplicates,
                              `blip.{vision_proj,text_proj,itm_head,temp}`, `proj_layer.*`)
  io.safetensors:
    pixel_values   (2, 3, 28, 28)
    input_ids      (2, T) int64   BERT ids of ["dog", "a red cat on the toy"] (padding=longest)
    attention_mask (2, T) int64
    image_embeds   (2, 17, 24)    visual_encoder(pixel_values).last_hidden_state (after post_layernorm)
    last_hidden    (2, Q+T, 32)   diffusers Q-Former last_hidden_state (bidirectional, = LAVIS ITM pass)
    ctx            (2, Q, 32)     diffusers forward(return_dict=False): proj_layer(last_hidden[:, :Q])
    query_hidden   (2, Q, 32)     LAVIS unimodal query pass (queries + cross-attention only)
    query_past_k_{i}, query_past_v_{i}  (2, heads, Q, 8) cached self-attention K/V of that pass, per layer
    text_hidden    (2, T, 32)     LAVIS unimodal text pass (padding mask)
    decoder_input_ids (2, T) int64 input_ids with [:, 0] = [DEC]
    itg_hidden     (2, T, 32)     LAVIS ITG text states, reusing the query pass K/V
    itg_logits     (2, T, V)      BertLMHeadModel logits (cached K/V path)
    itg_logits_recompute (2, T, V) same, recomputing the queries in one pass (UniLM mask)
    image_feats    (2, Q, 8)      normalize(vision_proj(query_hidden))
    text_feat      (2, 8)         normalize(text_proj(text_hidden[:, 0]))
    sim_i2t, sim_t2i (2, 2)       max over queries of the cosine similarities / temp
    itm_logits     (2, 2)         itm_head(last_hidden[:, :Q]).mean(1)
"""
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import types

import torch
import torch.nn.functional as F

from common import ROOT, out_dir, randomize_, save_fixture, seed

LAVIS_VERSION = "1.0.2"
LAVIS_WHEEL_SHA256 = "489782efc2d98d8e878112b2758f82ac2e6c10dfcfa087db6656465c7784d49f"


def lavis_wheel():
    """Path of the salesforce-lavis wheel: $BLIPD_LAVIS_WHEEL, or a cached `pip download --no-deps`."""
    env = os.environ.get("BLIPD_LAVIS_WHEEL")
    if env:
        return pathlib.Path(env)
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "blipd"
    whl = cache / f"salesforce_lavis-{LAVIS_VERSION}-py3-none-any.whl"
    if not whl.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", f"salesforce-lavis=={LAVIS_VERSION}",
             "-d", str(cache)],
            check=True,
        )
    import hashlib

    digest = hashlib.sha256(whl.read_bytes()).hexdigest()
    if digest != LAVIS_WHEEL_SHA256:
        raise SystemExit(f"{whl}: sha256 {digest} != pinned {LAVIS_WHEEL_SHA256}")
    return whl


def lavis_file(relpath, stubs=None):
    """Import one file of the LAVIS wheel (e.g. `lavis/models/blip2_models/Qformer.py`) as a module.

    `stubs` maps module names to attribute dicts, inserted in sys.modules first (for imports the file makes
    but the computation never uses, such as fairscale's checkpoint wrapper)."""
    import zipfile

    for name, attrs in (stubs or {}).items():
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub not in sys.modules:
                sys.modules[sub] = types.ModuleType(sub)
        for k, v in attrs.items():
            setattr(sys.modules[name], k, v)
    src = zipfile.ZipFile(lavis_wheel()).read(relpath)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="lavis-")) / pathlib.Path(relpath).name
    tmp.write_bytes(src)
    modname = "lavis_ref_" + pathlib.Path(relpath).stem
    spec = importlib.util.spec_from_file_location(modname, tmp)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def lavis_vit_module():
    """LAVIS `clip_vit.py` (the CLIP ViT-L/14 used by BLIP-2 / BLIP-Diffusion) with its unused imports stubbed."""
    return lavis_file(
        "lavis/models/clip_vit.py",
        stubs={
            "fairscale.nn.checkpoint.checkpoint_activations": {"checkpoint_wrapper": lambda m: m},
            "lavis.models.eva_vit": {"convert_weights_to_fp16": lambda m: m},
            "lavis.common.dist_utils": {"download_cached_file": None},
        },
    )


def vit_diffusers_to_lavis(sd, src="", dst=""):
    """Rename a diffusers Blip2VisionModel state dict (prefix `src`) into LAVIS CLIP-ViT names (prefix `dst`),
    the inverse of scripts/convert_blipdiffusion_to_diffusers.py. `post_layernorm` is returned separately
    (it is LAVIS's `ln_vision`, outside the ViT)."""
    out, ln_vision = {}, {}
    for k, v in sd.items():
        if not k.startswith(src):
            continue
        k = k[len(src):]
        if k == "embeddings.class_embedding":
            out["class_embedding"] = v.reshape(-1)
        elif k == "embeddings.position_embedding":
            out["positional_embedding"] = v[0]
        elif k == "embeddings.patch_embedding.weight":
            out["conv1.weight"] = v
        elif k.startswith("pre_layernorm."):
            out["ln_pre." + k.split(".", 1)[1]] = v
        elif k.startswith("post_layernorm."):
            ln_vision[k.split(".", 1)[1]] = v
        elif k.startswith("encoder.layers."):
            _, _, i, rest = k.split(".", 3)
            rest = (
                rest.replace("layer_norm1.", "ln_1.")
                .replace("layer_norm2.", "ln_2.")
                .replace("self_attn.qkv.weight", "attn.in_proj_weight")
                .replace("self_attn.qkv.bias", "attn.in_proj_bias")
                .replace("self_attn.projection.", "attn.out_proj.")
                .replace("mlp.fc1.", "mlp.c_fc.")
                .replace("mlp.fc2.", "mlp.c_proj.")
            )
            out[f"transformer.resblocks.{i}.{rest}"] = v
        else:
            raise KeyError(k)
    return {dst + k: v for k, v in out.items()}, ln_vision


def tiny_vocab(words):
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words


def bert_config_for_lavis(qcfg, num_query_tokens):
    from transformers import BertConfig

    c = BertConfig(
        vocab_size=qcfg.vocab_size,
        hidden_size=qcfg.hidden_size,
        num_hidden_layers=qcfg.num_hidden_layers,
        num_attention_heads=qcfg.num_attention_heads,
        intermediate_size=qcfg.intermediate_size,
        hidden_act=qcfg.hidden_act,
        max_position_embeddings=qcfg.max_position_embeddings,
        layer_norm_eps=qcfg.layer_norm_eps,
        pad_token_id=qcfg.pad_token_id,
    )
    c.encoder_width = qcfg.encoder_hidden_size
    c.add_cross_attention = True
    c.cross_attention_freq = qcfg.cross_attention_frequency
    c.query_length = num_query_tokens
    return c


def main():
    from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from transformers import BertTokenizer
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config

    seed(0)
    words = ("a dog cat red blue toy on the in sits green small big bowl ##s table sofa teddy bear car "
             "shoe can backpack vase clock").split()
    vocab = tiny_vocab(words)
    d = out_dir("qformer")
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    V = len(vocab) + 1  # + [DEC]
    Q = 4
    cfg = Blip2Config(
        vision_config=dict(
            hidden_size=24, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            image_size=28, patch_size=7, hidden_act="quick_gelu",
        ),
        qformer_config=dict(
            vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=16, cross_attention_frequency=2, encoder_hidden_size=24,
        ),
        num_query_tokens=Q,
    )
    with tempfile.TemporaryDirectory() as tok_dir:
        (pathlib.Path(tok_dir) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        cfg.tokenizer = tok_dir
        model = Blip2QFormerModel(cfg).eval()
    randomize_(model, s=1)
    tok = model.tokenizer
    dec_id = tok.bos_token_id
    assert dec_id == len(vocab) == V - 1, (dec_id, len(vocab))

    texts = ["dog", "a red cat on the toy"]
    enc = tok(texts, return_tensors="pt", padding=True)
    input_ids, attention_mask = enc.input_ids, enc.attention_mask
    g = torch.Generator().manual_seed(2)
    pixel_values = torch.randn(2, 3, 28, 28, generator=g)

    out = model(text_input=texts, image_input=pixel_values, return_dict=True)
    last_hidden = out.last_hidden_state
    ctx = model(text_input=texts, image_input=pixel_values, return_dict=False)
    image_embeds = model.visual_encoder(pixel_values).last_hidden_state

    # ---- LAVIS Q-Former with the same weights ----
    qf = lavis_file("lavis/models/blip2_models/Qformer.py")
    lcfg = bert_config_for_lavis(cfg.qformer_config, Q)
    lm = qf.BertLMHeadModel(lcfg).eval()
    assert lm.cls.predictions.decoder.weight is lm.bert.embeddings.word_embeddings.weight, "LM head not tied"
    sd = model.state_dict()
    bert_sd = {}
    for k, v in sd.items():
        if k.startswith("embeddings.") or k.startswith("encoder."):
            k2 = k.replace(".attention.attention.", ".attention.self.").replace(
                ".crossattention.attention.", ".crossattention.self.")
            bert_sd[k2] = v
    missing, unexpected = lm.bert.load_state_dict(bert_sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    gh = torch.Generator().manual_seed(3)
    with torch.no_grad():
        t = lm.cls.predictions.transform
        t.dense.weight.copy_(torch.randn(t.dense.weight.shape, generator=gh) / 32 ** 0.5)
        t.dense.bias.copy_(0.05 * torch.randn(t.dense.bias.shape, generator=gh))
        t.LayerNorm.weight.copy_(1 + 0.1 * torch.randn(32, generator=gh))
        t.LayerNorm.bias.copy_(0.05 * torch.randn(32, generator=gh))
        lm.cls.predictions.bias.copy_(0.05 * torch.randn(V, generator=gh))
    E = 8
    vision_proj = randomize_(torch.nn.Linear(32, E), s=4)
    text_proj = randomize_(torch.nn.Linear(32, E), s=5)
    itm_head = randomize_(torch.nn.Linear(32, 2), s=6)
    temp = torch.tensor(0.05)

    query_tokens = model.query_tokens.expand(2, -1, -1)
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    qo = lm.bert(query_embeds=query_tokens, encoder_hidden_states=image_embeds,
                 encoder_attention_mask=image_atts, use_cache=True, return_dict=True)
    query_hidden = qo.last_hidden_state
    to = lm.bert(input_ids, attention_mask=attention_mask, return_dict=True)
    text_hidden = to.last_hidden_state
    full_mask = torch.cat([torch.ones(2, Q, dtype=torch.long), attention_mask], dim=1)
    itm = lm.bert(input_ids, query_embeds=query_tokens, attention_mask=full_mask,
                  encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, return_dict=True)
    err = (itm.last_hidden_state - last_hidden).abs().max().item()
    assert err < 1e-5, f"LAVIS ITM pass vs diffusers: {err}"

    decoder_input_ids = input_ids.clone()
    decoder_input_ids[:, 0] = dec_id
    itg = lm(decoder_input_ids, attention_mask=full_mask, past_key_values=qo.past_key_values,
             output_hidden_states=True, return_dict=True)
    itg_logits = itg.logits
    itg_hidden = itg.hidden_states[-1]
    itg_re = lm(decoder_input_ids, query_embeds=query_tokens, attention_mask=full_mask,
                encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, use_cache=False,
                return_dict=True)
    itg_logits_recompute = itg_re.logits
    err = (itg_logits_recompute - itg_logits).abs().max().item()
    assert err < 1e-4, f"ITG cached vs recomputed: {err}"

    image_feats = F.normalize(vision_proj(query_hidden), dim=-1)
    text_feat = F.normalize(text_proj(text_hidden[:, 0, :]), dim=-1)
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat.unsqueeze(-1)).squeeze()  # (B, B, Q)
    sim_i2t = sim_q2t.max(-1)[0] / temp
    sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats.permute(0, 2, 1)).squeeze()
    sim_t2i = sim_t2q.max(-1)[0] / temp
    itm_logits = itm_head(last_hidden[:, :Q, :]).mean(dim=1)

    io = dict(
        pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
        image_embeds=image_embeds, last_hidden=last_hidden, ctx=ctx,
        query_hidden=query_hidden, text_hidden=text_hidden, decoder_input_ids=decoder_input_ids,
        itg_hidden=itg_hidden, itg_logits=itg_logits, itg_logits_recompute=itg_logits_recompute,
        image_feats=image_feats, text_feat=text_feat, sim_i2t=sim_i2t, sim_t2i=sim_t2i, itm_logits=itm_logits,
    )
    for i, (k, v) in enumerate(qo.past_key_values):
        io[f"query_past_k_{i}"] = k
        io[f"query_past_v_{i}"] = v

    # ---- LAVIS BlipDiffusion layout ----
    lavis = {}
    vit, ln_vision = vit_diffusers_to_lavis(sd, src="visual_encoder.", dst="blip.visual_encoder.")
    lavis.update(vit)
    lavis.update({f"blip.ln_vision.{k}": v for k, v in ln_vision.items()})
    lavis["blip.query_tokens"] = sd["query_tokens"]
    for k, v in lm.state_dict().items():
        lavis["blip.Qformer." + k] = v
    lavis["blip.vision_proj.weight"] = vision_proj.weight
    lavis["blip.vision_proj.bias"] = vision_proj.bias
    lavis["blip.text_proj.weight"] = text_proj.weight
    lavis["blip.text_proj.bias"] = text_proj.bias
    lavis["blip.itm_head.weight"] = itm_head.weight
    lavis["blip.itm_head.bias"] = itm_head.bias
    lavis["blip.temp"] = temp
    for k, v in sd.items():
        if k.startswith("proj_layer."):
            lavis[k] = v
    assert "blip.Qformer.cls.predictions.decoder.weight" in lavis
    assert "blip.Qformer.cls.predictions.decoder.bias" in lavis

    # The LAVIS ViT (wheel code) must reproduce image_embeds from the LAVIS-layout weights, up to its
    # LayerNorm eps (1e-5 vs the diffusers config's 1e-6).
    cv = lavis_vit_module()
    vcfg = cfg.vision_config
    # wheel 1.0.2 builds `layers - 1` blocks (LAVIS main builds `layers`); ask for one more.
    lvit = cv.VisionTransformer(vcfg.image_size, vcfg.patch_size, vcfg.hidden_size,
                                vcfg.num_hidden_layers + 1, vcfg.num_attention_heads, False).eval()
    lvit.load_state_dict({k[len("blip.visual_encoder."):]: v for k, v in vit.items()}, strict=True)
    ln = torch.nn.LayerNorm(vcfg.hidden_size)
    ln.load_state_dict(ln_vision)
    lavis_embeds = ln(lvit(pixel_values))
    err = (lavis_embeds - image_embeds).abs().max().item()
    print(f"LAVIS ViT (eps 1e-5) vs diffusers ViT (eps 1e-6): max-abs {err:.2e}")
    assert err < 1e-3
    io["image_embeds_lavis"] = lavis_embeds

    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in lavis.items()},
              str(d / "weights_lavis.safetensors"), metadata={"format": "pt"})

    config = cfg.to_dict()
    config.pop("tokenizer", None)
    config["_note"] = "tiny Blip2Config for parity tests; vocab.txt beside this file, [DEC] = last id"
    io = {k: (v if v.dtype == torch.int64 else v.float()) for k, v in io.items()}
    save_fixture("qformer", config, sd, io)


if __name__ == "__main__":
    main()
