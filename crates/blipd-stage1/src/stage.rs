//! The stage-1 [`Stage`] implementation: ITC + ITM + ITG on (image, caption) batches.

use blipd_models::tokenizers::BertTokenizer;
use blipd_train::{Stage, StepOutput, TrainRng};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::config::Stage1Config;
use crate::data::{normalize_caption, tokenize_captions, Stage1Batch};
use crate::losses::{stage1_losses, LossOptions, Negatives, TextBatch};
use crate::model::{vit_body, Stage1Components, Stage1Model};
use crate::Stage1Error;

/// Stage 1: owns the tokenizer and the loss settings; the trainer owns [`Stage1Model`].
pub struct Stage1<B: AutodiffBackend> {
    pub config: Stage1Config,
    pub tokenizer: BertTokenizer,
    pub image_size: usize,
    /// Caption length in tokens.
    pub max_txt_len: usize,
    pub options: LossOptions,
    pub device: B::Device,
}

impl<B: AutodiffBackend> Stage1<B> {
    /// Split loaded components into the stage and its trainable model (vision tower frozen).
    pub fn new(
        config: Stage1Config,
        parts: Stage1Components<B>,
        device: B::Device,
    ) -> Result<(Self, Stage1Model<B>), Stage1Error> {
        config.validate()?;
        let options = LossOptions {
            itc: config.itc,
            itm: config.itm,
            itg: config.itg,
            label_smoothing: config.label_smoothing,
            negative_weights: config.hard_negatives,
            dec_token_id: i64::from(parts.tokenizer.dec_id()),
            pad_token_id: i64::from(parts.tokenizer.pad_id()),
        };
        let model = parts.model.with_frozen(config.train_ln_vision);
        let stage = Self {
            tokenizer: parts.tokenizer,
            image_size: parts.image_size,
            max_txt_len: parts.max_txt_len,
            options,
            device,
            config,
        };
        Ok((stage, model))
    }

    /// Normalised, tokenized captions (`max_length` padding).
    pub fn tokenize(&self, captions: &[String]) -> Result<TextBatch, Stage1Error> {
        let norm: Vec<String> = captions
            .iter()
            .map(|c| normalize_caption(c, self.config.caption_max_words))
            .collect();
        tokenize_captions(&self.tokenizer, &norm, self.max_txt_len)
    }

    /// `ln_vision(ViT(pixels))`: the frozen tower runs without autodiff; `ln_vision` with it.
    pub fn image_embeds(&self, model: &Stage1Model<B>, pixels: TensorData) -> Tensor<B, 3> {
        let ve = model.qformer.visual_encoder.clone().valid();
        let px = Tensor::<B::InnerBackend, 4>::from_data(pixels, &self.device);
        let body = Tensor::<B, 3>::from_inner(vit_body(&ve, px));
        model.qformer.visual_encoder.post_layernorm.forward(body)
    }
}

impl<B: AutodiffBackend> Stage<B> for Stage1<B> {
    type Model = Stage1Model<B>;
    type Batch = Stage1Batch;

    fn step(
        &mut self,
        model: &Stage1Model<B>,
        batch: Stage1Batch,
        rng: &mut TrainRng,
    ) -> blipd_train::Result<StepOutput<B>> {
        let b = batch.len();
        let s = self.image_size;
        if b == 0 || batch.pixels.shape.as_slice() != [b, 3, s, s] {
            return Err(Stage1Error::Batch(format!(
                "{b} captions with pixels of shape {:?} (expected [{b}, 3, {s}, {s}])",
                batch.pixels.shape.as_slice()
            ))
            .into());
        }
        let text = self.tokenize(&batch.captions)?;
        let image_embeds = self.image_embeds(model, batch.pixels);
        let out = stage1_losses(
            &model.qformer,
            &model.heads,
            image_embeds,
            &text,
            None,
            Negatives::Sample(rng),
            &self.options,
        )?;
        let mut step = StepOutput::new(out.total.clone());
        for (name, v) in [("itc", out.itc), ("itm", out.itm), ("itg", out.itg)] {
            if let Some(v) = v {
                step = step.with_metric(name, v);
            }
        }
        step = step.with_metric("temp", model.heads.temp.val());
        Ok(step)
    }
}
