"""BLIP-2 stage-1 losses (ITC, ITM, ITG) → crates/blipd-stage1/tests/fixtures/stage1_losses.

The reference is **LAVIS's own `Blip2Qformer.forward`** from the salesforce-lavis 1.0.2 wheel
(`lavis/models/blip2_models/blip2_qformer.py`), run unchanged on a tiny random model:

* `Blip2Qformer.__init__` cannot run offline (it downloads `bert-base-uncased` and the EVA/CLIP ViT
  weights), so the object is made with `__new__` and its attributes are set by hand, exactly as
  `__init__` would leave them: `tokenizer` (transformers `BertTokenizer` over a tiny vocab.txt plus
  `add_special_tokens({"bos_token": "[DEC]"})`, as `Blip2Base.init_tokenizer` does), `visual_encoder`
  (the diffusers `Blip2VisionModel` without its `post_layernorm`, frozen), `ln_vision` (that
  `post_layernorm`, trainable as in BLIP-2), `Qformer` (the wheel's `Qformer.py` `BertLMHeadModel`,
  weights shared with the diffusers `Blip2QFormerModel` below), `query_tokens`, `vision_proj`,
  `text_proj`, `itm_head`, `temp`, `max_txt_len`.
* Its imports are the wheel's `base_model.py` (the real `concat_all_gather` / `all_gather_with_grad`) and
  `blip_outputs.py`; `registry` and the `Blip2Base` parent (only constructors we do not call) are stubbed.
* `forward` calls `dist.get_rank()` and the gathers use `torch.distributed`: a one-process gloo group is
  started, as a single-GPU LAVIS run under torchrun has. With it `concat_all_gather` returns gathered
  copies **without gradient** (as on any number of GPUs), which fixes the gradient semantics the Rust side
  follows: in ITC, `sim_i2t` back-propagates only into the local image features and `sim_t2i` only into
  the local text feature.
* `torch.multinomial` (hard-negative sampling) is intercepted in the module: the call's weights are
  recorded and the drawn index (from a seeded generator) is recorded too, so the Rust test can replay the
  same negatives and check its sampling weights.
* In the 1.0.2 wheel the hard-negative weights are `softmax(sim) + 1e-4` with the positive diagonal set
  to 0 (later LAVIS sets the diagonal of `sim` to −10000 before the softmax), and `temp` is **not**
  clamped in `Blip2Qformer.forward` (BLIP-1/ALBEF clamp it to [0.001, 0.5]).

Dropout is 0 in the config and the model is in eval mode, so the Rust autodiff backend (which runs
dropout on autodiff backends only when p > 0) sees the same function; gradients of the total loss for a
few parameters are recorded too, twice: with PyTorch's exact GELU derivative (`grad_*`), and with the
derivative Burn 0.21 uses for its erf GELU, which is the tanh approximation's
(`burn-backend/src/backend/ops/activation.rs::gelu_backward`; `grad_tanhgelu_*`). The losses are the
same in both runs; the Q-Former-internal gradients differ by ~3e-4 relative.

Files (all small):
  config.json        diffusers Blip2Config of the tiny Q-Former composite (+ `_stage1`: embed_dim,
                     max_txt_len, texts)
  vocab.txt          tiny BERT vocabulary ([DEC] added on top)
  qformer.safetensors   diffusers `qformer/` state dict (visual_encoder, query_tokens, embeddings,
                        encoder, proj_layer)
  heads.safetensors  `Blip2Qformer`-relative head keys: vision_proj.*, text_proj.*, itm_head.*, temp [1],
                     Qformer.cls.predictions.{bias, transform.*} (decoder tied to the word embeddings)
  io.safetensors:
    pixel_values (B,3,28,28); input_ids, attention_mask (B, max_txt_len) int64 (LAVIS tokenizer call);
    neg_image_idx, neg_text_idx (B,) int64; weights_t2i, weights_i2t (B,B) (the multinomial weights);
    sim_i2t, sim_t2i (B,B); itm_logits (3B,2); loss_itc, loss_itm, loss_lm, loss (1,);
    grad_<name>, grad_tanhgelu_<name> gradients of `loss` for: temp, query_tokens, vision_proj.weight, text_proj.weight,
    itm_head.weight, ln_vision.weight, word_embeddings, cls_bias, crossattention key weight (layer 0).
"""
import json
import pathlib
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gen_qformer as gq  # noqa: E402
from common import ROOT, randomize_, seed  # noqa: E402

OUT = ROOT / "crates" / "blipd-stage1" / "tests" / "fixtures" / "stage1_losses"
B = 4
Q = 4
E = 8
MAX_TXT_LEN = 10
TEXTS = [
    "a red dog",
    "a small blue cat sits on the sofa",
    "the green car in the big bowl on a small table with a teddy bear",  # truncated to 10 tokens
    "a vase",
]


class VitBody(nn.Module):
    """LAVIS `visual_encoder(image)`: the ViT before `ln_vision` (diffusers keeps that norm inside)."""

    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, x):
        h = self.v.pre_layernorm(self.v.embeddings(x))
        return self.v.encoder(inputs_embeds=h, return_dict=True).last_hidden_state


class TanhDerivGelu(torch.autograd.Function):
    """Exact (erf) GELU forward with the derivative of the tanh approximation, as Burn 0.21's
    `gelu_backward` computes it (burn-backend/src/backend/ops/activation.rs, same constants)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.gelu(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        c1, c2, c3, c4 = 0.0356774, 0.797885, 0.0535161, 0.398942
        x3 = x ** 3
        t = torch.tanh(c1 * x3 + c2 * x)
        return g * (0.5 * t + (c3 * x3 + c4 * x) * (1 - t ** 2) + 0.5)


class TanhDerivGeluModule(nn.Module):
    def forward(self, x):
        return TanhDerivGelu.apply(x)


class TorchProxy:
    """`torch` as seen by blip2_qformer.py, with `multinomial` recorded and drawn from a fixed generator."""

    def __init__(self, gen):
        self.gen = gen
        self.calls = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def multinomial(self, weights, n):
        idx = torch.multinomial(weights, n, generator=self.gen)
        self.calls.append((weights.detach().clone(), int(idx.item())))
        return idx


def param_grads(m, lm):
    return {
        "temp": m.temp.grad.reshape(1).clone(),
        "query_tokens": m.query_tokens.grad.clone(),
        "vision_proj_weight": m.vision_proj.weight.grad.clone(),
        "text_proj_weight": m.text_proj.weight.grad.clone(),
        "itm_head_weight": m.itm_head.weight.grad.clone(),
        "ln_vision_weight": m.ln_vision.weight.grad.clone(),
        "word_embeddings": lm.bert.embeddings.word_embeddings.weight.grad.clone(),
        "cls_bias": lm.cls.predictions.bias.grad.clone(),
        "cross_key_weight_0": lm.bert.encoder.layer[0].crossattention.self.key.weight.grad.clone(),
    }


def load_lavis_blip2_qformer():
    bm = gq.lavis_file(
        "lavis/models/base_model.py",
        stubs={
            "lavis.common.dist_utils": {
                "download_cached_file": None,
                "is_dist_avail_and_initialized": lambda: dist.is_available() and dist.is_initialized(),
            },
            "lavis.common.utils": {"get_abs_path": None, "is_url": None},
            "omegaconf": {"OmegaConf": None},
        },
    )
    sys.modules["lavis.models.base_model"] = bm
    bo = gq.lavis_file("lavis/models/blip_models/blip_outputs.py")
    sys.modules["lavis.models.blip_models.blip_outputs"] = bo

    class Registry:
        @staticmethod
        def register_model(_name):
            return lambda cls: cls

    class Blip2Base(nn.Module):
        pass

    return gq.lavis_file(
        "lavis/models/blip2_models/blip2_qformer.py",
        stubs={
            "lavis.common.registry": {"registry": Registry()},
            "lavis.models.blip2_models.blip2": {
                "Blip2Base": Blip2Base,
                "compute_sim_matrix": None,
                "disabled_train": None,
            },
        },
    )


def main():
    from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from safetensors.torch import save_file
    from transformers import BertTokenizer
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config

    seed(0)
    words = ("a dog cat red blue toy on the in sits green small big bowl ##s table sofa teddy bear car "
             "shoe can backpack vase clock with").split()
    vocab = gq.tiny_vocab(words)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.txt").write_text("\n".join(vocab) + "\n")
    V = len(vocab) + 1  # + [DEC]
    cfg = Blip2Config(
        vision_config=dict(
            hidden_size=24, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            image_size=28, patch_size=7, hidden_act="quick_gelu",
        ),
        qformer_config=dict(
            vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=16, cross_attention_frequency=2, encoder_hidden_size=24,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ),
        num_query_tokens=Q,
    )
    with tempfile.TemporaryDirectory() as tok_dir:
        (pathlib.Path(tok_dir) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        cfg.tokenizer = tok_dir
        model = Blip2QFormerModel(cfg).eval()
    with torch.no_grad():
        randomize_(model, s=11)
    sd = model.state_dict()

    # ---- The LAVIS Q-Former (BertLMHeadModel) with the same weights ----
    qf = gq.lavis_file("lavis/models/blip2_models/Qformer.py")
    lcfg = gq.bert_config_for_lavis(cfg.qformer_config, Q)
    lcfg.hidden_dropout_prob = 0.0
    lcfg.attention_probs_dropout_prob = 0.0
    lm = qf.BertLMHeadModel(lcfg).eval()
    bert_sd = {}
    for k, v in sd.items():
        if k.startswith("embeddings.") or k.startswith("encoder."):
            k2 = k.replace(".attention.attention.", ".attention.self.").replace(
                ".crossattention.attention.", ".crossattention.self.")
            bert_sd[k2] = v
    missing, unexpected = lm.bert.load_state_dict(bert_sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    gh = torch.Generator().manual_seed(12)
    with torch.no_grad():
        t = lm.cls.predictions.transform
        t.dense.weight.copy_(torch.randn(t.dense.weight.shape, generator=gh) / 32 ** 0.5)
        t.dense.bias.copy_(0.05 * torch.randn(t.dense.bias.shape, generator=gh))
        t.LayerNorm.weight.copy_(1 + 0.1 * torch.randn(32, generator=gh))
        t.LayerNorm.bias.copy_(0.05 * torch.randn(32, generator=gh))
        lm.cls.predictions.bias.copy_(0.05 * torch.randn(V, generator=gh))
    assert lm.cls.predictions.decoder.weight is lm.bert.embeddings.word_embeddings.weight

    # ---- Blip2Qformer, attributes as __init__ leaves them ----
    bq = load_lavis_blip2_qformer()
    Blip2Qformer = bq.Blip2Qformer
    m = Blip2Qformer.__new__(Blip2Qformer)
    nn.Module.__init__(m)
    tok = BertTokenizer(str(OUT / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    assert tok.bos_token_id == V - 1
    m.tokenizer = tok
    m.visual_encoder = VitBody(model.visual_encoder)
    for p in m.visual_encoder.parameters():
        p.requires_grad = False
    m.ln_vision = model.visual_encoder.post_layernorm
    for p in m.ln_vision.parameters():  # VitBody holds it too, unused there; it is trained in BLIP-2
        p.requires_grad = True
    m.Qformer = lm
    m.query_tokens = model.query_tokens
    with torch.no_grad():
        m.vision_proj = randomize_(nn.Linear(32, E), s=13)
        m.text_proj = randomize_(nn.Linear(32, E), s=14)
        m.itm_head = randomize_(nn.Linear(32, 2), s=15)
    m.temp = nn.Parameter(0.1 * torch.ones([]))
    m.max_txt_len = MAX_TXT_LEN
    m.eval()
    assert m.ln_vision.weight.requires_grad and m.query_tokens.requires_grad

    proxy = TorchProxy(torch.Generator().manual_seed(5))
    bq.torch = proxy
    dist.init_process_group(
        "gloo", init_method=f"file://{tempfile.mkdtemp()}/pg", rank=0, world_size=1
    )
    g = torch.Generator().manual_seed(6)
    pixel_values = torch.randn(B, 3, 28, 28, generator=g)

    torch.set_grad_enabled(True)
    out = m.forward({"image": pixel_values, "text_input": TEXTS})
    out.loss.backward()
    grads = param_grads(m, lm)
    # Second pass with Burn's GELU derivative (same negatives: same weights, same generator seed), so
    # that the Rust gradients can be checked tightly too; the loss values do not change.
    m.zero_grad()
    calls = proxy.calls
    proxy.gen.manual_seed(5)
    proxy.calls = []
    for mod in lm.modules():
        for attr in ("intermediate_act_fn", "transform_act_fn"):
            if hasattr(mod, attr):
                setattr(mod, attr, TanhDerivGeluModule())
    out2 = m.forward({"image": pixel_values, "text_input": TEXTS})
    out2.loss.backward()
    assert out2.loss.item() == out.loss.item()
    assert [i for _, i in proxy.calls] == [i for _, i in calls]
    grads_tanh = param_grads(m, lm)
    proxy.calls = calls
    torch.set_grad_enabled(False)
    dist.destroy_process_group()

    assert len(proxy.calls) == 2 * B, len(proxy.calls)
    weights_t2i = torch.stack([w for w, _ in proxy.calls[:B]])
    weights_i2t = torch.stack([w for w, _ in proxy.calls[B:]])
    neg_image_idx = torch.tensor([i for _, i in proxy.calls[:B]], dtype=torch.int64)
    neg_text_idx = torch.tensor([i for _, i in proxy.calls[B:]], dtype=torch.int64)
    print("negative images per text:", neg_image_idx.tolist(), "negative texts per image:",
          neg_text_idx.tolist())

    # Intermediates for debugging, recomputed the same way (no grad).
    enc = tok(TEXTS, padding="max_length", truncation=True, max_length=MAX_TXT_LEN, return_tensors="pt")
    image_embeds = m.ln_vision(m.visual_encoder(pixel_values))
    qo = lm.bert(query_embeds=m.query_tokens.expand(B, -1, -1), encoder_hidden_states=image_embeds,
                 use_cache=True, return_dict=True)
    image_feats = torch.nn.functional.normalize(m.vision_proj(qo.last_hidden_state), dim=-1)
    to = lm.bert(enc.input_ids, attention_mask=enc.attention_mask, return_dict=True)
    text_feat = torch.nn.functional.normalize(m.text_proj(to.last_hidden_state[:, 0, :]), dim=-1)
    sim = torch.einsum("iqe,te->itq", image_feats, text_feat).max(-1)[0] / m.temp
    ids_all = torch.cat([enc.input_ids, enc.input_ids, enc.input_ids[neg_text_idx]], 0)
    atts_all = torch.cat([enc.attention_mask, enc.attention_mask, enc.attention_mask[neg_text_idx]], 0)
    img_all = torch.cat([image_embeds, image_embeds[neg_image_idx], image_embeds], 0)
    itm = lm.bert(ids_all, query_embeds=m.query_tokens.expand(3 * B, -1, -1),
                  attention_mask=torch.cat([torch.ones(3 * B, Q, dtype=torch.long), atts_all], 1),
                  encoder_hidden_states=img_all, return_dict=True)
    itm_logits = m.itm_head(itm.last_hidden_state[:, :Q]).mean(1)

    # The recomputed intermediates must reproduce LAVIS's loss values.
    tgt = torch.arange(B)
    F = torch.nn.functional
    itc = (F.cross_entropy(sim, tgt, label_smoothing=0.1) + F.cross_entropy(sim.t(), tgt, label_smoothing=0.1)) / 2
    assert abs(itc.item() - out.loss_itc.item()) < 1e-5, (itc.item(), out.loss_itc.item())
    itm_l = F.cross_entropy(itm_logits, torch.cat([torch.ones(B), torch.zeros(2 * B)]).long())
    assert abs(itm_l.item() - out.loss_itm.item()) < 1e-5, (itm_l.item(), out.loss_itm.item())
    w = F.softmax(sim.t(), dim=1) + 1e-4
    w.fill_diagonal_(0)
    assert torch.allclose(w, weights_t2i, atol=1e-6)

    io = dict(
        pixel_values=pixel_values, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
        neg_image_idx=neg_image_idx, neg_text_idx=neg_text_idx,
        weights_t2i=weights_t2i, weights_i2t=weights_i2t, sim_i2t=sim, sim_t2i=sim.t().contiguous(),
        itm_logits=itm_logits,
        loss_itc=out.loss_itc.reshape(1), loss_itm=out.loss_itm.reshape(1), loss_lm=out.loss_lm.reshape(1),
        loss=out.loss.reshape(1),
    )
    io.update({f"grad_{k}": v for k, v in grads.items()})
    io.update({f"grad_tanhgelu_{k}": v for k, v in grads_tanh.items()})
    io = {k: (v if v.dtype == torch.int64 else v.float()).detach().contiguous().clone() for k, v in io.items()}
    for k in ("loss_itc", "loss_itm", "loss_lm", "loss"):
        print(f"{k} = {io[k].item():.6f}")

    heads = {
        "vision_proj.weight": m.vision_proj.weight, "vision_proj.bias": m.vision_proj.bias,
        "text_proj.weight": m.text_proj.weight, "text_proj.bias": m.text_proj.bias,
        "itm_head.weight": m.itm_head.weight, "itm_head.bias": m.itm_head.bias,
        "temp": m.temp.detach().reshape(1),
    }
    for k, v in lm.cls.state_dict().items():
        if k in ("predictions.decoder.weight", "predictions.decoder.bias"):
            continue  # tied to word_embeddings / the same tensor as predictions.bias
        heads["Qformer.cls." + k] = v
    clean = lambda d: {k: v.detach().contiguous().clone() for k, v in d.items()}  # noqa: E731
    save_file(clean(sd), str(OUT / "qformer.safetensors"), metadata={"format": "pt"})
    save_file(clean(heads), str(OUT / "heads.safetensors"), metadata={"format": "pt"})
    save_file(io, str(OUT / "io.safetensors"))
    config = cfg.to_dict()
    config.pop("tokenizer", None)
    config["_stage1"] = dict(embed_dim=E, max_txt_len=MAX_TXT_LEN, texts=TEXTS, lavis="1.0.2")
    (OUT / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    size = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"stage1_losses: {size / 1024:.0f} KiB in {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
