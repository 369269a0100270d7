"""Parity fixture for the context CLIP text encoder (crates/blipd-models/src/ctx_clip_text.rs).

Reference: diffusers 0.33.1 `diffusers.pipelines.blip_diffusion.modeling_ctx_clip.ContextCLIPTextModel`
(tiny random weights), run with and without context embeddings, plus transformers 4.44.2 `CLIPTextModel`
loaded with the same weights (plain CLIP text, also at the full position budget).
"""
import torch
from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
from transformers import CLIPTextConfig, CLIPTextModel

from common import randomize_, save_fixture, seed

NAME = "ctx_clip_text"
CTX_LEN = 16
CTX_BEGIN_POS = 2


def main():
    seed(0)
    # Same numbers as ClipTextConfig::tiny() in Rust. eos_token_id 2 = SD-1.5's legacy value.
    cfg = CLIPTextConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=24,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    ctx_model = ContextCLIPTextModel(cfg).eval()
    randomize_(ctx_model, s=1)
    sd = ctx_model.state_dict()
    assert "text_model.embeddings.position_ids" in sd  # persistent in diffusers; Rust must drop it

    plain = CLIPTextModel(cfg).eval()
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    assert not missing, missing
    assert unexpected in ([], ["text_model.embeddings.position_ids"]), unexpected

    g = torch.Generator().manual_seed(2)
    batch, length = 2, 8
    input_ids = torch.randint(3, 99, (batch, length), generator=g)
    input_ids[:, 0] = 0  # BOS-like
    input_ids[0, 5] = 2  # EOS at 5, then pads (= EOS) as in SD
    input_ids[0, 6:] = 2
    input_ids[1, -1] = 2
    ctx = torch.randn(batch, CTX_LEN, cfg.hidden_size, generator=g)
    long_ids = torch.randint(3, 99, (batch, cfg.max_position_embeddings), generator=g)
    long_ids[:, 0] = 0
    long_ids[:, 20:] = 2

    with torch.no_grad():
        out_ctx = ctx_model(
            input_ids=input_ids, ctx_embeddings=ctx, ctx_begin_pos=[CTX_BEGIN_POS] * batch
        )[0]
        out_ctx0 = ctx_model(input_ids=input_ids, ctx_embeddings=ctx, ctx_begin_pos=[0] * batch)[0]
        out_noctx = ctx_model(input_ids=input_ids, ctx_embeddings=None)[0]
        ref_plain = plain(input_ids=input_ids)
        ref_long = plain(input_ids=long_ids)

    assert out_ctx.shape == (batch, length + CTX_LEN, cfg.hidden_size)
    # Without context the diffusers model is a plain CLIPTextModel (final LN eps 1e-5 = config eps here).
    assert torch.allclose(out_noctx, ref_plain.last_hidden_state, atol=1e-6)

    io = {
        "input_ids": input_ids.to(torch.int64),
        "ctx_embeddings": ctx,
        "out_ctx": out_ctx,
        "out_ctx_pos0": out_ctx0,
        "out_noctx": out_noctx,
        "clip_last_hidden_state": ref_plain.last_hidden_state,
        "clip_pooler_output": ref_plain.pooler_output,
        "long_input_ids": long_ids.to(torch.int64),
        "clip_long_last_hidden_state": ref_long.last_hidden_state,
    }
    # What save_pretrained writes (fields equal to the defaults are omitted: tests our serde defaults).
    save_fixture(NAME, cfg.to_diff_dict(), sd, io)


if __name__ == "__main__":
    main()
