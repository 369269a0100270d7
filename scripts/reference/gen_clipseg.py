"""Tiny random transformers CLIPSegForImageSegmentation (transformers 4.44.2) → tests/fixtures/clipseg.

Same structure as CIDAS/clipseg-rd64-refined (CLIP vision + text towers, FiLM on the text embedding,
3 extracted layers, post-LN decoder layers, refined head with two stride-patch/4 transposed convs) at
tiny width. The text config keeps the checkpoint's legacy `eos_token_id: 2`, so pooling takes the argmax
token id, as the real model does; `cond_first_eos` checks the modern first-EOS rule on other ids.

Vision: hidden 32, 5 layers (extract_layers [0, 2, 3], so layer 4 only feeds pooled_output),
image_size 32, patch 8. The main input is 48×48 (6×6 grid ≠ the configured 4×4: position embeddings are
bicubic-interpolated, as the real model at 352×352); `logits_native` uses a 32×32 input.

io.safetensors:
  pixel_values (2, 3, 48, 48), input_ids (2, 8) int64, attention_mask (2, 8) int64
  logits (2, 24, 24) (grid 6 × (patch/4)², the refined head), conditional_embeddings (2, 16),
  pooled_output (2, 16)
  pixel_values_native (2, 3, 32, 32), logits_native (2, 16, 16)
  input_ids_first_eos (2, 8) int64, cond_first_eos (2, 16)  (text_model.eos_token_id = 500)
"""
import torch
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

from common import randomize_, save_fixture, seed

seed(0)
config = CLIPSegConfig(
    text_config=dict(
        vocab_size=1000,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
    ),
    vision_config=dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=5,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-4,
    ),
    projection_dim=16,
    extract_layers=[0, 2, 3],
    reduce_dim=16,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=24,
    conditional_layer=0,
    use_complex_transposed_convolution=True,
)
model = CLIPSegForImageSegmentation(config).eval()
randomize_(model, s=3)

g = torch.Generator().manual_seed(4)
pixel_values = torch.randn(2, 3, 48, 48, generator=g)
pixel_values_native = torch.randn(2, 3, 32, 32, generator=g)
BOS, EOS = 998, 999
input_ids = torch.tensor(
    [
        [BOS, 5, 17, EOS, EOS, EOS, EOS, EOS],
        [BOS, 40, 3, 77, 12, 250, EOS, EOS],
    ],
    dtype=torch.long,
)
attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.long)

out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
logits = out.logits
cond = out.conditional_embeddings
pooled = out.pooled_output
logits_native = model(input_ids=input_ids, pixel_values=pixel_values_native, attention_mask=attention_mask).logits

# Modern first-EOS pooling (eos_token_id != 2): EOS 500 is not the largest id in these rows.
input_ids_first_eos = torch.tensor(
    [
        [BOS, 5, 500, 999, 999, 999, 999, 999],
        [BOS, 40, 3, 500, 12, 500, 999, 999],
    ],
    dtype=torch.long,
)
model.clip.text_model.eos_token_id = 500
cond_first_eos = model.clip.get_text_features(input_ids_first_eos)
model.clip.text_model.eos_token_id = 2

cfg = config.to_dict()
save_fixture(
    "clipseg",
    cfg,
    model.state_dict(),
    dict(
        pixel_values=pixel_values,
        input_ids=input_ids,
        attention_mask=attention_mask,
        logits=logits,
        conditional_embeddings=cond,
        pooled_output=pooled,
        pixel_values_native=pixel_values_native,
        logits_native=logits_native,
        input_ids_first_eos=input_ids_first_eos,
        cond_first_eos=cond_first_eos,
    ),
)
print("logits", tuple(logits.shape), float(logits.abs().max()), "cond", float(cond.abs().max()))
