//! The stage-1 [`Stage`] implementation: ITC + ITM + ITG on (image, caption) batches.

use blipd_models::tokenizers::BertTokenizer;
use blipd_train::{GradSync, Stage, StepOutput, TrainRng};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::config::Stage1Config;
use crate::data::{normalize_caption, tokenize_captions, Stage1Batch};
use crate::losses::{stage1_losses, GatherFn, Gathered, LossOptions, Negatives, TextBatch};
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
    /// Seed of the per-sample ITM negative streams (the run seed; see [`ITM_STREAM`]).
    pub sample_seed: u64,
    /// Matrix products in this dtype during the forward pass (`[train] mixed_precision`; see
    /// [`blipd_models::amp`]).
    pub autocast: Option<burn::tensor::FloatDType>,
}

/// Base of the per-sample ITM negative streams (`(run.seed, ITM_STREAM + global sample key)`).
pub const ITM_STREAM: u64 = 0x4954_4d00_0000_0000;

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
        let mut model = parts.model.with_frozen(config.train_ln_vision);
        if let Some(p) = config.dropout {
            model.qformer.set_dropout(p);
        }
        let stage = Self {
            tokenizer: parts.tokenizer,
            image_size: parts.image_size,
            max_txt_len: parts.max_txt_len,
            options,
            device,
            config,
            sample_seed: 0,
            autocast: None,
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
        self.forward(model, batch, rng, None)
    }

    /// With several ranks, ITC compares every local image with every rank's texts (and the
    /// reverse) and ITM draws its hard negatives from the whole global batch, as LAVIS does with
    /// `concat_all_gather` (no gradient) and `all_gather_with_grad` (image tokens). The gather is
    /// one host all-gather per step of this rank's features, image tokens and token ids; the local
    /// image tokens keep their gradient, other ranks' arrive without one (so with a trainable
    /// `ln_vision`, the ITM gradient through *another rank's* negative image tokens is not sent
    /// back to that rank — LAVIS's `all_gather_with_grad` does send it).
    fn step_dist(
        &mut self,
        model: &Stage1Model<B>,
        batch: Stage1Batch,
        rng: &mut TrainRng,
        comm: &mut dyn GradSync<B::InnerBackend>,
    ) -> blipd_train::Result<StepOutput<B>> {
        if comm.world_size() == 1 {
            return self.forward(model, batch, rng, None);
        }
        let rank = comm.rank();
        let mut gather = |img: &Tensor<B, 3>,
                          txt: &Tensor<B, 2>,
                          emb: &Tensor<B, 3>,
                          text: &TextBatch|
         -> Result<Gathered<B>, Stage1Error> {
            gather_across_ranks(comm, rank, img, txt, emb, text)
        };
        self.forward(model, batch, rng, Some(&mut gather))
    }
}

/// Packs this rank's values into one buffer, all-gathers it, and rebuilds every rank's tensors
/// (rank order; this rank's image tokens are the attached local tensor).
fn gather_across_ranks<B: AutodiffBackend>(
    comm: &mut dyn GradSync<B::InnerBackend>,
    rank: usize,
    img: &Tensor<B, 3>,
    txt: &Tensor<B, 2>,
    emb: &Tensor<B, 3>,
    text: &TextBatch,
) -> Result<Gathered<B>, Stage1Error> {
    let host = |t: TensorData, what: &str| -> Result<Vec<f32>, Stage1Error> {
        t.convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| Stage1Error::Gather(format!("reading {what}: {e:?}")))
    };
    let [b, q, e] = img.dims();
    let [_, nv, dv] = emb.dims();
    let t = text.len;
    if text.ids.iter().any(|&id| !(0..1 << 24).contains(&id)) {
        return Err(Stage1Error::Gather(
            "token ids must be in [0, 2^24) to travel as f32".into(),
        ));
    }
    let mut buf = host(img.to_data(), "image features")?;
    buf.extend(host(txt.to_data(), "text features")?);
    buf.extend(host(emb.clone().detach().into_data(), "image tokens")?);
    buf.extend(text.ids.iter().map(|&v| v as f32));
    buf.extend(text.mask.iter().map(|&v| v as f32));
    let per = buf.len();
    let all = comm
        .all_gather(&buf)
        .map_err(|e| Stage1Error::Gather(e.to_string()))?;
    if per == 0 || all.len() % per != 0 {
        return Err(Stage1Error::Gather(format!(
            "gathered {} values, not a multiple of this rank's {per}",
            all.len()
        )));
    }
    let w = all.len() / per;
    let device = img.device();
    let (n_img, n_txt, n_emb, n_tok) = (b * q * e, b * e, b * nv * dv, b * t);
    let (mut imgs, mut txts) = (Vec::new(), Vec::new());
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    let mut emb_parts: Vec<Tensor<B, 3>> = Vec::with_capacity(w);
    for r in 0..w {
        let part = &all[r * per..(r + 1) * per];
        let (a, rest) = part.split_at(n_img);
        let (tf, rest) = rest.split_at(n_txt);
        let (em, rest) = rest.split_at(n_emb);
        let (id, mk) = rest.split_at(n_tok);
        imgs.extend_from_slice(a);
        txts.extend_from_slice(tf);
        ids.extend(id.iter().map(|&v| v as i64));
        mask.extend(mk.iter().map(|&v| v as i64));
        if r == rank {
            emb_parts.push(emb.clone());
        } else {
            emb_parts.push(Tensor::from_data(
                TensorData::new(em.to_vec(), [b, nv, dv]),
                &device,
            ));
        }
    }
    Ok(Gathered {
        image_feats: Tensor::from_data(TensorData::new(imgs, [w * b, q, e]), &device),
        text_feat: Tensor::from_data(TensorData::new(txts, [w * b, e]), &device),
        image_embeds: Tensor::cat(emb_parts, 0),
        text: TextBatch {
            ids,
            mask,
            batch: w * b,
            len: t,
        },
        offset: rank * b,
    })
}

impl<B: AutodiffBackend> Stage1<B> {
    fn forward(
        &mut self,
        model: &Stage1Model<B>,
        batch: Stage1Batch,
        rng: &mut TrainRng,
        gather: Option<&mut GatherFn<'_, B>>,
    ) -> blipd_train::Result<StepOutput<B>> {
        let _autocast = blipd_models::amp::Autocast::enter(self.autocast);
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
        // Batches that carry their samples' global keys draw each sample's ITM negatives from its
        // own stream, so the draws do not depend on the number of ranks.
        let mut per_sample: Vec<Box<dyn rand::RngCore>> = if batch.keys.len() == b {
            batch
                .keys
                .iter()
                .map(|&k| {
                    Box::new(TrainRng::new(self.sample_seed, ITM_STREAM + k))
                        as Box<dyn rand::RngCore>
                })
                .collect()
        } else {
            Vec::new()
        };
        let negatives = if per_sample.is_empty() {
            Negatives::Sample(rng)
        } else {
            Negatives::PerSample(&mut per_sample)
        };
        let out = stage1_losses(
            &model.qformer,
            &model.heads,
            image_embeds,
            &text,
            gather,
            negatives,
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
