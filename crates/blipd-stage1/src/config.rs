//! The `[stage]` section of a stage-1 run config.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::losses::NegativeWeights;
use crate::Stage1Error;

/// `[stage]` of a stage-1 run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage1Config {
    /// `"tiny"` (tests; self-contained tokenizer over the synthetic captions' words) or `"full"`
    /// (BLIP-Diffusion sizes: CLIP ViT-L/14 23 layers, BERT-base Q-Former, 16 queries, embed_dim 256),
    /// random weights unless `model_dir` / `bert_init` give them.
    #[serde(default = "default_preset")]
    pub preset: String,
    /// A diffusers folder (`Salesforce/blipdiffusion` layout, using its `qformer/`) or a `qformer/`
    /// component folder (`config.json` + weights): the architecture and initial weights of the vision
    /// tower and the Q-Former (e.g. a previous stage-1 export). Overrides `preset`.
    #[serde(default)]
    pub model_dir: Option<PathBuf>,
    /// A BERT checkpoint (`bert-base-uncased` `model.safetensors` or `pytorch_model.bin`) to initialise
    /// the Q-Former body and the LM head from, as LAVIS `init_Qformer` does (`*_query` FFNs copied from
    /// the text FFNs, cross-attention and queries fresh, `[DEC]` row added). Applied after `model_dir`
    /// (which then only provides the vision tower).
    #[serde(default)]
    pub bert_init: Option<PathBuf>,
    /// Stage-1 heads to start from (`Blip2Qformer`-relative keys as [`crate::model::export`] writes
    /// them: `vision_proj.*`, `text_proj.*`, `itm_head.*`, `temp`, `Qformer.cls.predictions.*`).
    #[serde(default)]
    pub heads_init: Option<PathBuf>,
    /// The BERT-uncased `vocab.txt` (else `<model_dir>/qformer/vocab.txt`, else `$BLIPD_BERT_VOCAB`).
    /// Not used by the tiny preset.
    #[serde(default)]
    pub bert_vocab: Option<PathBuf>,
    /// Caption tokens (`padding="max_length"`, truncation), `[CLS]` and `[SEP]` included. Default:
    /// LAVIS's 32, capped at the Q-Former's position embeddings (16 for the tiny preset, whose Q-Former
    /// then equals stage 2's tiny one; a larger explicit value grows the tiny preset's positions).
    #[serde(default)]
    pub max_txt_len: Option<usize>,
    /// ITC embedding size (LAVIS `embed_dim` 256; the tiny preset uses 8). Default: the preset's.
    #[serde(default)]
    pub embed_dim: Option<usize>,
    /// Which losses are on (total = sum of those on).
    #[serde(default = "yes")]
    pub itc: bool,
    #[serde(default = "yes")]
    pub itm: bool,
    #[serde(default = "yes")]
    pub itg: bool,
    /// ITC / ITG label smoothing (LAVIS 0.1).
    #[serde(default = "default_smoothing")]
    pub label_smoothing: f64,
    /// ITM hard-negative weights (`lavis102` as in the 1.0.2 wheel, or `masked_softmax`).
    #[serde(default)]
    pub hard_negatives: NegativeWeights,
    /// Train `ln_vision` (the vision tower's `post_layernorm`), as BLIP-2 does (only the ViT blocks are
    /// frozen there). False freezes it with the tower.
    #[serde(default = "yes")]
    pub train_ln_vision: bool,
    /// LAVIS `blip_caption` caption normalisation (lowercase, punctuation → spaces, at most
    /// `max_words` words), as the BLIP-2 pre-training datasets apply it. 0 turns it off.
    #[serde(default = "default_max_words")]
    pub caption_max_words: usize,
    /// Q-Former dropout probability (BERT's hidden and attention dropout). Default: the Q-Former
    /// config's (0.1 for BLIP-2). 0 makes steps deterministic given the data, e.g. to compare a
    /// data-parallel run with one process.
    #[serde(default)]
    pub dropout: Option<f64>,
}

fn default_preset() -> String {
    "tiny".into()
}
fn default_smoothing() -> f64 {
    crate::losses::LABEL_SMOOTHING
}
fn default_max_words() -> usize {
    50
}
fn yes() -> bool {
    true
}

impl Default for Stage1Config {
    fn default() -> Self {
        Self {
            preset: default_preset(),
            model_dir: None,
            bert_init: None,
            heads_init: None,
            bert_vocab: None,
            max_txt_len: None,
            embed_dim: None,
            itc: true,
            itm: true,
            itg: true,
            label_smoothing: default_smoothing(),
            hard_negatives: NegativeWeights::default(),
            train_ln_vision: true,
            caption_max_words: default_max_words(),
            dropout: None,
        }
    }
}

impl Stage1Config {
    pub fn validate(&self) -> Result<(), Stage1Error> {
        let bad = |m: String| Err(Stage1Error::Config(m));
        if self.model_dir.is_none() && !matches!(self.preset.as_str(), "tiny" | "full") {
            return bad(format!(
                "preset = {:?}: expected \"tiny\" or \"full\" (or set model_dir)",
                self.preset
            ));
        }
        if let Some(p) = self.dropout.filter(|p| !(0.0..1.0).contains(p)) {
            return bad(format!("dropout = {p}: expected a probability in [0, 1)"));
        }
        if !(self.itc || self.itm || self.itg) {
            return bad("itc, itm and itg are all false: nothing to train".into());
        }
        if let Some(n) = self.max_txt_len.filter(|&n| n < 2) {
            return bad(format!(
                "max_txt_len = {n} leaves no room for [CLS] … [SEP]"
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(format!(
                "label_smoothing = {} must be in [0, 1)",
                self.label_smoothing
            ));
        }
        if self.embed_dim == Some(0) {
            return bad("embed_dim must be ≥ 1".into());
        }
        Ok(())
    }
}
