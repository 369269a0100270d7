//! The stage-2 networks: the trainable model and the frozen parts around it.

use std::path::Path;

use blipd_models::ctx_clip_text::{ClipTextConfig, ContextClipTextModel};
use blipd_models::qformer::{Blip2Config, Blip2QFormerModel};
use blipd_models::tokenizers::{BertTokenizer, ClipTokenizer};
use blipd_models::unet::{self, UNet2DConditionConfig, UNet2DConditionModel};
use blipd_models::vae::{AutoencoderKL, VaeConfig};
use blipd_models::weights::{DiffusersFolder, StateDict};
use blipd_models::ModelError;
use burn::module::Module;
use burn::prelude::*;

use crate::config::{QFormerInit, Stage2Config};

/// What stage 2 trains: the Q-Former composite (its ViT is frozen inside it), the context CLIP text
/// encoder and the U-Net.
#[derive(Module, Debug)]
pub struct Stage2Model<B: Backend> {
    pub qformer: Blip2QFormerModel<B>,
    pub text_encoder: ContextClipTextModel<B>,
    pub unet: UNet2DConditionModel<B>,
}

impl<B: Backend> Stage2Model<B> {
    /// Freeze what the config says is frozen: always the vision tower; the text encoder when
    /// `train_text_encoder = false`.
    pub fn with_frozen(mut self, cfg: &Stage2Config) -> Self {
        self.qformer.visual_encoder = self.qformer.visual_encoder.no_grad();
        if !cfg.train_text_encoder {
            self.text_encoder = self.text_encoder.no_grad();
        }
        self
    }
}

/// Everything stage 2 needs, built from a preset or loaded from a diffusers folder.
pub struct Stage2Components<B: Backend> {
    pub model: Stage2Model<B>,
    pub vae: AutoencoderKL<B>,
    pub vae_config: VaeConfig,
    /// Configs of the trainable networks (the U-Net carries its own), for exporting.
    pub blip_config: Blip2Config,
    pub text_config: ClipTextConfig,
    pub clip_tokenizer: ClipTokenizer,
    pub bert_tokenizer: BertTokenizer,
    /// Vision tower input size (224 at full size).
    pub image_size: usize,
    /// CLIP text positions (77).
    pub max_text_len: usize,
    /// Subject embeddings per prompt (the Q-Former's queries, 16).
    pub num_ctx: usize,
}

/// The four network configs of a preset: Q-Former (with its vision tower), text encoder, U-Net, VAE.
pub type PresetConfigs = (
    Blip2Config,
    ClipTextConfig,
    UNet2DConditionConfig,
    VaeConfig,
);

/// Configs of the tiny stage-2 model (dimensions agree across networks: width 32, 4 queries,
/// 28-px subject images, 32-px targets → 8×8 latents).
pub fn tiny_configs(vocab_size: usize) -> PresetConfigs {
    let blip = Blip2Config::tiny();
    let width = blip.qformer_config.hidden_size;
    let text = ClipTextConfig {
        vocab_size,
        max_position_embeddings: 40,
        hidden_size: width,
        ..ClipTextConfig::tiny()
    };
    let mut unet = UNet2DConditionConfig::tiny();
    unet.cross_attention_dim = blipd_models::unet::OneOrMany::One(width);
    let vae = VaeConfig::tiny();
    (blip, text, unet, vae)
}

/// Configs of the micro stage-2 model (the procedural world of `configs/micro.toml`): the tiny
/// Q-Former and text encoder (width 32, 4 queries), a U-Net and VAE sized for 32-px targets with
/// 16×16 latents ([`UNet2DConditionConfig::micro`], [`VaeConfig::micro`]).
pub fn micro_configs(vocab_size: usize) -> PresetConfigs {
    let (blip, text, _, _) = tiny_configs(vocab_size);
    let mut unet = UNet2DConditionConfig::micro();
    unet.cross_attention_dim = blipd_models::unet::OneOrMany::One(text.hidden_size);
    (blip, text, unet, VaeConfig::micro())
}

/// The network configs of a preset (`tiny` sizes its text encoder to `clip_vocab_size`).
pub(crate) fn preset_configs(
    preset: &str,
    clip_vocab_size: usize,
) -> Result<PresetConfigs, ModelError> {
    Ok(match preset {
        "tiny" => tiny_configs(clip_vocab_size),
        "micro" => micro_configs(clip_vocab_size),
        "sd15" => (
            Blip2Config::blipdiffusion(),
            ClipTextConfig::sd15(),
            UNet2DConditionConfig::sd15(),
            VaeConfig::sd15(),
        ),
        other => {
            return Err(ModelError::Invalid(format!(
                "unknown preset {other:?} (expected \"tiny\", \"micro\" or \"sd15\")"
            )))
        }
    })
}

impl<B: Backend> Stage2Components<B> {
    /// Random networks of a preset with the given tokenizers (tiny runs build their own vocabularies).
    pub fn from_preset(
        preset: &str,
        clip_tokenizer: ClipTokenizer,
        bert_tokenizer: BertTokenizer,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let (blip, text, unet, vae) = preset_configs(preset, clip_tokenizer.vocab_size())?;
        let mut blip = blip;
        blip.qformer_config.vocab_size = blip
            .qformer_config
            .vocab_size
            .max(bert_tokenizer.vocab_size());
        let image_size = blip.vision_config.image_size;
        let num_ctx = blip.num_query_tokens;
        let max_text_len = text.max_position_embeddings;
        Ok(Self {
            model: Stage2Model {
                qformer: blip.init(device)?,
                text_encoder: text.init(device)?,
                unet: unet.init(device)?,
            },
            vae: vae.init(device)?,
            vae_config: vae,
            blip_config: blip,
            text_config: text,
            clip_tokenizer,
            bert_tokenizer,
            image_size,
            max_text_len,
            num_ctx,
        })
    }

    /// Load a diffusers folder (the `Salesforce/blipdiffusion` layout), strictly.
    pub fn from_diffusers(
        dir: &Path,
        cfg: &Stage2Config,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let folder = DiffusersFolder::open(dir)?;
        let qdir = folder.component("qformer");
        let blip = Blip2Config::from_file(&qdir.config_path())?;
        let qformer = blip.init(device)?;
        let qformer = match &cfg.qformer_init {
            QFormerInit::Pretrained => qformer.load_state_dict(qdir.state_dict()?)?,
            QFormerInit::Random => qformer,
            QFormerInit::Stage1(path) => {
                // A stage-1 checkpoint carries the Q-Former (and ViT) in the diffusers qformer layout;
                // the projection layer is new in stage 2, so it keeps its initialisation.
                let sd = StateDict::read(path)?;
                load_partial_qformer(qformer, sd)?
            }
        };
        let text_encoder = ContextClipTextModel::from_dir(&dir.join("text_encoder"), device)?;
        let text_config = ClipTextConfig::from_file(&dir.join("text_encoder").join("config.json"))?;
        let unet = unet::load(&folder.component("unet"), device)?;
        let (vae, vae_config) = AutoencoderKL::load(&folder.component("vae"), device)?;
        let clip_tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        let bert_tokenizer = BertTokenizer::resolve(Some(dir), cfg.bert_vocab.as_deref())?;
        Ok(Self {
            blip_config: blip.clone(),
            text_config,
            image_size: blip.vision_config.image_size,
            num_ctx: blip.num_query_tokens,
            max_text_len: text_encoder.max_position_embeddings,
            model: Stage2Model {
                qformer,
                text_encoder,
                unet,
            },
            vae,
            vae_config,
            clip_tokenizer,
            bert_tokenizer,
        })
    }
}

/// Load a stage-1 Q-Former checkpoint: every key but the projection layer must be present.
pub fn load_partial_qformer<B: Backend>(
    qformer: Blip2QFormerModel<B>,
    sd: StateDict,
) -> Result<Blip2QFormerModel<B>, ModelError> {
    // Fill the projection layer from the freshly initialised module, then load strictly.
    let mut sd = sd;
    let have: std::collections::BTreeSet<String> = sd.keys().cloned().collect();
    let own = blipd_models::weights::collect_reference(
        &qformer,
        &blipd_models::qformer::reverse_key_map(),
    )?;
    for (k, v) in own {
        if k.starts_with("proj_layer.") && !have.contains(&k) {
            sd.insert(k, v);
        }
    }
    qformer.load_state_dict(sd)
}
