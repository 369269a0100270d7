//! CLIP (transformers `CLIPModel`, e.g. `openai/clip-vit-base-patch32`): both towers, their projections and
//! the contrastive temperature. Used by the DreamBench evaluation (CLIP-I: image–image cosine of
//! `image_embeds`; CLIP-T: cosine of `image_embeds` and the prompt's `text_embeds`).
//!
//! Reference: transformers 4.44.2 `models/clip/modeling_clip.py` (`CLIPModel`):
//! - text: token + position embeddings → pre-LN layers under a causal mask (plus the padding mask when
//!   given) → `final_layer_norm` → the row at the EOS token (argmax id when `eos_token_id == 2`, the
//!   legacy value of the OpenAI configs; otherwise the first `eos_token_id`) → `text_projection` (no bias);
//! - vision: patch conv (no bias) → prepend `class_embedding` → + `position_embedding` → `pre_layrnorm`
//!   (sic, transformers' spelling) → pre-LN layers → `post_layernorm` of the CLS row →
//!   `visual_projection` (no bias). transformers 4.44.2 has no position interpolation for CLIP, so the
//!   input must have the configured `image_size` (this port errors otherwise);
//! - `text_embeds` / `image_embeds` are those features divided by their L2 norm; `logits_per_image` =
//!   `exp(logit_scale) · image_embeds · text_embedsᵀ`.
//!
//! The towers are the CLIP towers of [`crate::clipseg`] (`CLIPSegModel` *is* a CLIP model with the same
//! key names, configs and math), so the state dict loads with an identity key map. Not to be confused
//! with BLIP-2's CLIP ViT-L in [`crate::clip_vision`] (fused `qkv`, BLIP-2 key names, `ln_vision`
//! instead of the CLS pooling and projection).

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};

use crate::clipseg::{
    ClipSegTextConfig, ClipSegTextTransformer, ClipSegVisionConfig, ClipSegVisionTransformer,
};
use crate::nn::linear;
use crate::weights::{
    collect_reference, load_strict, write_safetensors, ComponentDir, KeyMap, StateDict,
};
use crate::ModelError;

/// transformers `CLIPTextConfig`: the same fields and 4.44.2 defaults as CLIPSeg's text config.
pub type ClipTextConfig = ClipSegTextConfig;
/// transformers `CLIPVisionConfig`: the same fields and 4.44.2 defaults (ViT-B/32 at 224) as CLIPSeg's.
pub type ClipVisionConfig = ClipSegVisionConfig;

/// transformers `CLIPConfig` (`config.json` of a CLIP checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            text_config: ClipTextConfig::default(),
            vision_config: ClipVisionConfig::default(),
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
        }
    }
}

const ACTIVATIONS: &[&str] = &["quick_gelu", "gelu", "relu"];

impl ClipConfig {
    /// `openai/clip-vit-base-patch32` (DreamBooth's CLIP-I / CLIP-T model): the transformers defaults
    /// plus the legacy text `bos_token_id` 0 / `eos_token_id` 2 of the hub config. 151.3 M parameters.
    pub fn vit_b32() -> Self {
        Self {
            text_config: ClipTextConfig {
                bos_token_id: Some(0),
                eos_token_id: Some(2),
                ..ClipTextConfig::default()
            },
            ..Self::default()
        }
    }

    /// The parity fixture's numbers (`scripts/reference/gen_clip.py`): text width 24 (544-token tiny
    /// vocabulary), vision width 32 at 32 px with patch 8, projection 16.
    pub fn tiny() -> Self {
        Self {
            text_config: ClipTextConfig {
                vocab_size: 544,
                hidden_size: 24,
                intermediate_size: 40,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                max_position_embeddings: 77,
                bos_token_id: Some(0),
                eos_token_id: Some(2),
                ..ClipTextConfig::default()
            },
            vision_config: ClipVisionConfig {
                hidden_size: 32,
                intermediate_size: 48,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                image_size: 32,
                patch_size: 8,
                ..ClipVisionConfig::default()
            },
            projection_dim: 16,
            ..Self::default()
        }
    }

    /// Read a transformers `config.json` and check it.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ModelError> {
        let cfg: Self = crate::read_json(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Invalid(format!("CLIP config: {m}")));
        let (t, v) = (&self.text_config, &self.vision_config);
        for (what, act) in [("text", &t.hidden_act), ("vision", &v.hidden_act)] {
            if !ACTIVATIONS.contains(&act.as_str()) {
                return bad(format!(
                    "unsupported {what} hidden_act `{act}` (one of {ACTIVATIONS:?})"
                ));
            }
        }
        for (what, d, h) in [
            ("text", t.hidden_size, t.num_attention_heads),
            ("vision", v.hidden_size, v.num_attention_heads),
        ] {
            if h == 0 || d == 0 || !d.is_multiple_of(h) {
                return bad(format!(
                    "{what} width {d} is not a positive multiple of {h} heads"
                ));
            }
        }
        if v.patch_size == 0 || v.image_size < v.patch_size || v.num_channels == 0 {
            return bad(format!(
                "patch_size {} does not fit image_size {}",
                v.patch_size, v.image_size
            ));
        }
        if t.max_position_embeddings == 0 || t.vocab_size == 0 || self.projection_dim == 0 {
            return bad("empty text vocabulary, positions or projection".into());
        }
        Ok(())
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<ClipModel<B>, ModelError> {
        self.validate()?;
        Ok(ClipModel {
            text_model: ClipSegTextTransformer::new(&self.text_config, device),
            vision_model: ClipSegVisionTransformer::new(&self.vision_config, device),
            visual_projection: linear(
                self.vision_config.hidden_size,
                self.projection_dim,
                false,
                device,
            ),
            text_projection: linear(
                self.text_config.hidden_size,
                self.projection_dim,
                false,
                device,
            ),
            logit_scale: Param::from_tensor(Tensor::from_floats(
                [self.logit_scale_init_value as f32],
                device,
            )),
            image_size: self.vision_config.image_size,
        })
    }
}

/// transformers `CLIPModel`.
#[derive(Module, Debug)]
pub struct ClipModel<B: Backend> {
    pub text_model: ClipSegTextTransformer<B>,
    pub vision_model: ClipSegVisionTransformer<B>,
    pub visual_projection: burn::nn::Linear<B>,
    pub text_projection: burn::nn::Linear<B>,
    /// A 0-d tensor in transformers; `[1]` here (the loaders reshape).
    pub logit_scale: Param<Tensor<B, 1>>,
    pub image_size: usize,
}

/// Rows divided by their L2 norm (as transformers: `x / x.norm(p=2, dim=-1, keepdim=True)`).
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt();
    x / norm
}

impl<B: Backend> ClipModel<B> {
    /// `get_text_features`: token ids `[B, L]` (+ optional 0/1 attention mask) → `[B, projection_dim]`.
    pub fn text_features(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 2>, ModelError> {
        Ok(crate::amp::linear(
            &self.text_projection,
            self.text_model.pooled(input_ids, attention_mask)?,
        ))
    }

    /// `get_image_features`: normalised pixels `[B, 3, S, S]` (S = `image_size`) → `[B, projection_dim]`.
    pub fn image_features(&self, pixel_values: Tensor<B, 4>) -> Result<Tensor<B, 2>, ModelError> {
        let [_, c, h, w] = pixel_values.dims();
        let c_expected = self.vision_model.embeddings.patch_embedding.weight.dims()[1];
        if c != c_expected || h != self.image_size || w != self.image_size {
            return Err(ModelError::Invalid(format!(
                "CLIP vision: pixel_values with {c} channels at {h}×{w}, expected {c_expected} at {s}×{s} \
                 (the CLIP image processor's crop size)",
                s = self.image_size
            )));
        }
        let n = self.vision_model.encoder.layers.len();
        let last = match self
            .vision_model
            .hidden_states(pixel_values.clone(), n)
            .pop()
        {
            Some(h) => h,
            None => self
                .vision_model
                .pre_layrnorm
                .forward(self.vision_model.embeddings.forward(pixel_values)),
        };
        let [b, _, d] = last.dims();
        let cls = last.slice([0..b, 0..1, 0..d]).reshape([b, d]);
        Ok(crate::amp::linear(
            &self.visual_projection,
            self.vision_model.post_layernorm.forward(cls),
        ))
    }

    /// `CLIPModel(...).text_embeds`: L2-normalised text features.
    pub fn text_embeds(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 2>, ModelError> {
        Ok(l2_normalize(self.text_features(input_ids, attention_mask)?))
    }

    /// `CLIPModel(...).image_embeds`: L2-normalised image features.
    pub fn image_embeds(&self, pixel_values: Tensor<B, 4>) -> Result<Tensor<B, 2>, ModelError> {
        Ok(l2_normalize(self.image_features(pixel_values)?))
    }

    /// `logits_per_image` `[B_img, B_text]` from normalised embeddings.
    pub fn logits_per_image(
        &self,
        image_embeds: Tensor<B, 2>,
        text_embeds: Tensor<B, 2>,
    ) -> Tensor<B, 2> {
        let scale = self.logit_scale.val().exp().reshape([1, 1]);
        image_embeds.matmul(text_embeds.transpose()) * scale
    }

    /// Build from `cfg` and a transformers-layout state dict (strict). Drops the non-persistent
    /// `position_ids` buffers older files carry and reshapes the 0-d `logit_scale`.
    pub fn from_state_dict(
        cfg: &ClipConfig,
        mut sd: StateDict,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        sd.drop_keys(|k| k.ends_with("embeddings.position_ids"));
        const SCALE: &str = "logit_scale";
        if sd
            .tensors
            .get(SCALE)
            .is_some_and(|s| s.shape.num_dims() == 0)
        {
            let v = sd
                .take(SCALE)?
                .convert::<f32>()
                .to_vec::<f32>()
                .map_err(|e| ModelError::Invalid(format!("{SCALE}: {e:?}")))?;
            sd.insert(SCALE, TensorData::new(v, [1]));
        }
        let model = cfg.init(device)?;
        Ok(load_strict(model, sd, &key_map(), "clip")?)
    }

    /// Load a transformers model folder (`config.json` + `model.safetensors` or `pytorch_model.bin`).
    pub fn load(
        dir: &std::path::Path,
        device: &B::Device,
    ) -> Result<(Self, ClipConfig), ModelError> {
        let comp = ComponentDir {
            name: "clip".into(),
            dir: dir.to_path_buf(),
        };
        let cfg = ClipConfig::from_file(&comp.config_path())?;
        let model = Self::from_state_dict(&cfg, comp.state_dict()?, device)?;
        Ok((model, cfg))
    }

    /// Save in the transformers layout (safetensors, `logit_scale` 0-d as in transformers).
    pub fn save(&self, path: &std::path::Path) -> Result<(), ModelError> {
        let mut tensors = collect_reference(self, &KeyMap::identity())?;
        for (name, data) in tensors.iter_mut() {
            if name == "logit_scale" {
                let v = data
                    .clone()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .map_err(|e| ModelError::Invalid(format!("{name}: {e:?}")))?;
                *data = TensorData::new(v, Vec::<usize>::new());
            }
        }
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        Ok(write_safetensors(path, &tensors, Some(meta))?)
    }
}

/// transformers `CLIPModel` keys → our module paths: identical.
pub fn key_map() -> KeyMap {
    KeyMap::identity()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_config_parses_to_vit_b32() {
        // openai/clip-vit-base-patch32 config.json, abridged to the keys that differ from defaults or
        // that this port reads (the hub file repeats every PretrainedConfig field).
        let json = r#"{"architectures": ["CLIPModel"], "initializer_factor": 1.0,
          "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 512,
          "text_config": {"bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu",
            "hidden_size": 512, "intermediate_size": 2048, "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 8,
            "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 512, "vocab_size": 49408},
          "vision_config": {"hidden_act": "quick_gelu", "hidden_size": 768, "image_size": 224,
            "intermediate_size": 3072, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
            "num_attention_heads": 12, "num_hidden_layers": 12, "patch_size": 32, "projection_dim": 512}}"#;
        let cfg: ClipConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg, ClipConfig::vit_b32());
        cfg.validate().unwrap();
    }

    #[test]
    fn validate_rejects_bad_configs() {
        let mut c = ClipConfig::tiny();
        c.vision_config.hidden_act = "swish".into();
        assert!(c.validate().is_err());
        let mut c = ClipConfig::tiny();
        c.text_config.num_attention_heads = 5;
        assert!(c.validate().is_err());
        let mut c = ClipConfig::tiny();
        c.vision_config.patch_size = 0;
        assert!(c.validate().is_err());
    }
}
