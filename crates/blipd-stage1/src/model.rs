//! The stage-1 networks (Q-Former composite + stage-1 heads), how they are built, and the export that
//! stage 2 starts from.

use std::path::{Path, PathBuf};

use blipd_data::synthetic::vocabulary;
use blipd_models::clip_vision::Blip2VisionModel;
use blipd_models::qformer::{
    heads_reverse_key_map, Blip2Config, Blip2QFormerModel, QFormerHeads, QFormerHeadsConfig,
};
use blipd_models::tokenizers::BertTokenizer;
use blipd_models::weights::{component_weight_file, save_safetensors, StateDict};
use blipd_models::ModelError;
use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::Distribution;

use crate::config::Stage1Config;
use crate::tiny::tiny_bert_tokenizer;
use crate::Stage1Error;

/// What stage 1 trains: the diffusers `Blip2QFormerModel` composite (its ViT blocks frozen, `ln_vision`
/// = `visual_encoder.post_layernorm` trainable by default, `proj_layer` frozen and unused) and the
/// BLIP-2 stage-1 heads (`vision_proj`, `text_proj`, `itm_head`, `temp`, LM head).
#[derive(Module, Debug)]
pub struct Stage1Model<B: Backend> {
    pub qformer: Blip2QFormerModel<B>,
    pub heads: QFormerHeads<B>,
}

impl<B: Backend> Stage1Model<B> {
    /// Freeze the vision tower (all but `post_layernorm` when `train_ln_vision`) and the projection
    /// layer (a stage-2 module that stage 1 never runs).
    pub fn with_frozen(mut self, train_ln_vision: bool) -> Self {
        let mut ve = self.qformer.visual_encoder;
        ve.embeddings = ve.embeddings.no_grad();
        ve.pre_layernorm = ve.pre_layernorm.no_grad();
        ve.encoder = ve.encoder.no_grad();
        if !train_ln_vision {
            ve.post_layernorm = ve.post_layernorm.no_grad();
        }
        self.qformer.visual_encoder = ve;
        self.qformer.proj_layer = self.qformer.proj_layer.no_grad();
        self
    }
}

/// The vision tower up to (not including) `post_layernorm`: LAVIS `visual_encoder(image)`.
pub fn vit_body<B: Backend>(ve: &Blip2VisionModel<B>, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
    let mut x = ve
        .pre_layernorm
        .forward(ve.embeddings.forward(pixel_values));
    for layer in &ve.encoder.layers {
        x = layer.forward(x);
    }
    x
}

/// Everything stage 1 needs, from a preset or a `model_dir`.
pub struct Stage1Components<B: Backend> {
    pub model: Stage1Model<B>,
    pub tokenizer: BertTokenizer,
    pub blip_config: Blip2Config,
    pub heads_config: QFormerHeadsConfig,
    /// Vision tower input side (224 at full size).
    pub image_size: usize,
    /// Caption length in tokens (`[stage] max_txt_len` or its default).
    pub max_txt_len: usize,
}

/// LAVIS `Blip2Qformer(max_txt_len=32)`.
pub const DEFAULT_MAX_TXT_LEN: usize = 32;

/// Tiny sizes: [`Blip2Config::tiny`] (vocabulary grown to the tokenizer's if needed, positions to
/// `max_txt_len`) — the same Q-Former as stage 2's tiny preset with the default `max_txt_len` 16.
pub fn tiny_config(vocab_size: usize, max_txt_len: usize) -> Blip2Config {
    let mut c = Blip2Config::tiny();
    c.qformer_config.vocab_size = c.qformer_config.vocab_size.max(vocab_size);
    c.qformer_config.max_position_embeddings =
        c.qformer_config.max_position_embeddings.max(max_txt_len);
    c
}

/// The `qformer/` folder of `dir`: `dir/qformer` when it has a config, else `dir` itself.
pub fn qformer_dir(dir: &Path) -> PathBuf {
    let sub = dir.join("qformer");
    if sub.join("config.json").is_file() {
        sub
    } else {
        dir.to_path_buf()
    }
}

impl<B: Backend> Stage1Components<B> {
    pub fn from_config(cfg: &Stage1Config, device: &B::Device) -> Result<Self, Stage1Error> {
        cfg.validate()?;
        let (blip, qformer, tokenizer, tiny) = match &cfg.model_dir {
            Some(dir) => {
                let qdir = qformer_dir(dir);
                let blip = Blip2Config::from_file(&qdir.join("config.json"))?;
                let sd = StateDict::read(&component_weight_file(&qdir)?)?;
                let qformer = blip.init::<B>(device)?.load_state_dict(sd)?;
                // `resolve` looks in `<root>/qformer/vocab.txt`.
                let root = qdir.parent().unwrap_or(Path::new("."));
                let tok = BertTokenizer::resolve(Some(root), cfg.bert_vocab.as_deref())?;
                (blip, qformer, tok, false)
            }
            None => {
                let (blip, tok, tiny) = match cfg.preset.as_str() {
                    "tiny" => {
                        let tok = tiny_bert_tokenizer(&vocabulary())?;
                        (
                            tiny_config(tok.vocab_size(), cfg.max_txt_len.unwrap_or(0)),
                            tok,
                            true,
                        )
                    }
                    _ => (
                        Blip2Config::blipdiffusion(),
                        BertTokenizer::resolve(None, cfg.bert_vocab.as_deref())?,
                        false,
                    ),
                };
                let mut qformer = blip.init::<B>(device)?;
                // LAVIS: `query_tokens.data.normal_(0, initializer_range)` (zeros would keep every
                // query identical forever).
                let std = blip.qformer_config.initializer_range;
                let q = qformer.query_tokens.val();
                qformer.query_tokens = Param::from_tensor(Tensor::random(
                    q.shape(),
                    Distribution::Normal(0.0, std),
                    device,
                ));
                (blip, qformer, tok, tiny)
            }
        };
        let q = &blip.qformer_config;
        if tokenizer.vocab_size() > q.vocab_size {
            return Err(Stage1Error::Config(format!(
                "the BERT tokenizer has {} tokens (with [DEC]) but the Q-Former only {} embeddings",
                tokenizer.vocab_size(),
                q.vocab_size
            )));
        }
        let max_txt_len = cfg
            .max_txt_len
            .unwrap_or(DEFAULT_MAX_TXT_LEN.min(q.max_position_embeddings));
        if max_txt_len > q.max_position_embeddings {
            return Err(Stage1Error::Config(format!(
                "max_txt_len = {max_txt_len} exceeds the Q-Former's {} position embeddings",
                q.max_position_embeddings
            )));
        }
        let heads_sd = cfg.heads_init.as_deref().map(StateDict::read).transpose()?;
        // embed_dim: explicit, else the heads file's, else the preset's (8 tiny, 256 LAVIS).
        let file_dim = match &heads_sd {
            Some(sd) => Some(sd.data("vision_proj.bias")?.shape.num_elements()),
            None => None,
        };
        let heads_config = QFormerHeadsConfig {
            embed_dim: cfg
                .embed_dim
                .or(file_dim)
                .unwrap_or(if tiny { 8 } else { 256 }),
            dec_token_id: i64::from(tokenizer.dec_id()),
            ..QFormerHeadsConfig::for_qformer(q)
        };
        let mut heads = heads_config.init::<B>(device)?;
        if let Some(sd) = heads_sd {
            heads = heads.load_state_dict(sd)?;
        }
        let image_size = blip.vision_config.image_size;
        let mut model = Stage1Model { qformer, heads };
        if let Some(path) = &cfg.bert_init {
            model = crate::model::bert_init(model, StateDict::read(path)?)?;
        }
        Ok(Self {
            model,
            tokenizer,
            blip_config: blip,
            heads_config,
            image_size,
            max_txt_len,
        })
    }
}

/// Write the Q-Former composite (vision tower incl. `ln_vision`, queries, embeddings, encoder,
/// `proj_layer`) as one safetensors file in the diffusers `qformer/` layout: what stage 2's
/// `QFormerInit::Stage1(path)` loads (strictly; `proj_layer` keys may be absent there).
pub fn export_qformer<B: Backend>(model: &Stage1Model<B>, path: &Path) -> Result<(), Stage1Error> {
    Ok(model.qformer.save(path)?)
}

/// Write the stage-1 heads with `Blip2Qformer`-relative keys (`vision_proj.*`, `text_proj.*`,
/// `itm_head.*`, `temp` as `[1]`, `Qformer.cls.predictions.*` without the tied decoder) — what
/// `[stage] heads_init` reads.
pub fn export_heads<B: Backend>(model: &Stage1Model<B>, path: &Path) -> Result<(), Stage1Error> {
    Ok(save_safetensors(
        &model.heads,
        &heads_reverse_key_map(),
        path,
    )?)
}

/// A loadable folder: `dir/qformer/{config.json, model.safetensors, vocab.txt}` (a diffusers
/// `qformer/` component, usable as a stage-1 or stage-2 `model_dir`'s qformer) and
/// `dir/stage1_heads.safetensors`.
pub fn export<B: Backend>(
    model: &Stage1Model<B>,
    blip: &Blip2Config,
    tokenizer: &BertTokenizer,
    dir: &Path,
) -> Result<(), Stage1Error> {
    let q = dir.join("qformer");
    let io = |path: &Path, source: std::io::Error| {
        Stage1Error::Model(ModelError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    std::fs::create_dir_all(&q).map_err(|e| io(&q, e))?;
    let json = serde_json::to_string_pretty(blip)
        .map_err(|e| Stage1Error::Config(format!("serialising the Q-Former config: {e}")))?;
    let cfg_path = q.join("config.json");
    std::fs::write(&cfg_path, json).map_err(|e| io(&cfg_path, e))?;
    let vocab_path = q.join("vocab.txt");
    std::fs::write(&vocab_path, vocab_txt(tokenizer)).map_err(|e| io(&vocab_path, e))?;
    export_qformer(model, &q.join("model.safetensors"))?;
    export_heads(model, &dir.join("stage1_heads.safetensors"))
}

/// The tokenizer's `vocab.txt` (ids in order, `[DEC]` left out: it is added on loading).
fn vocab_txt(tok: &BertTokenizer) -> String {
    let vocab = tok.inner().get_vocab(false);
    let mut items: Vec<(u32, String)> = vocab.into_iter().map(|(t, i)| (i, t)).collect();
    items.sort();
    let mut out = String::new();
    for (i, t) in items {
        if i == tok.dec_id() {
            continue;
        }
        out.push_str(&t);
        out.push('\n');
    }
    out
}

/// Initialise the Q-Former body and LM head from a BERT checkpoint (see
/// [`Stage1Config::bert_init`](crate::Stage1Config::bert_init)).
pub fn bert_init<B: Backend>(
    model: Stage1Model<B>,
    bert: StateDict,
) -> Result<Stage1Model<B>, Stage1Error> {
    crate::bert::apply(model, bert)
}
