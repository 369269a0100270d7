//! BLIP-2 stage-1 losses, as LAVIS 1.0.2 `Blip2Qformer.forward` defines them.
//!
//! - **ITC**: unimodal query pass → `vision_proj` → L2-norm (`[B, Q, E]`); unimodal text pass → `[CLS]`
//!   → `text_proj` → L2-norm (`[B, E]`). `sim_i2t[b, j] = max_q ⟨img_b,q, txt_j⟩ / temp` against the
//!   texts of *all* ranks, `sim_t2i` likewise against all images; targets are global indices
//!   `offset + b`; loss = ½ (CE(sim_i2t) + CE(sim_t2i)) with label smoothing 0.1. As in LAVIS (whose
//!   `concat_all_gather` has no gradient), the gathered side carries no gradient: `sim_i2t`
//!   back-propagates into the local image features only, `sim_t2i` into the local text features only.
//!   With one rank the "gathered" tensors are detached copies of the local ones.
//! - **ITM**: hard negatives drawn without gradient from the ITC similarities ([`negative_weights`],
//!   [`sample_negatives`]), one negative image per text and one negative text per image; 3B pairs (texts
//!   `[pos, pos, neg]` × images `[pos, neg, pos]`) through the bidirectional multimodal pass; `itm_head`
//!   averaged over the queries; plain CE against `[1]·B + [0]·2B`.
//! - **ITG**: decoder ids = text ids with `[CLS]` replaced by `[DEC]`; labels = those ids with padding
//!   → ignored; causal text over the query prefix, reusing the query pass's self-attention K/V; the LM
//!   head (decoder tied to the word embeddings); shift-by-one CE with label smoothing 0.1, averaged over
//!   the non-ignored tokens.
//!
//! Total = ITC + ITM + ITG (each can be switched off).

use blipd_models::qformer::{itg_decoder_input_ids, Blip2QFormerModel, QFormerHeads, QueryCache};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

use crate::Stage1Error;

/// PyTorch's `ignore_index` default.
pub const IGNORE_INDEX: i64 = -100;

/// LAVIS's label smoothing for ITC and ITG.
pub const LABEL_SMOOTHING: f64 = 0.1;

/// Tokenized text on the host: `[B, T]` ids and attention mask (1 = token, 0 = padding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextBatch {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub batch: usize,
    pub len: usize,
}

impl TextBatch {
    /// From row vectors (all the same length).
    pub fn from_rows(ids: &[Vec<i64>], mask: &[Vec<i64>]) -> Result<Self, Stage1Error> {
        let batch = ids.len();
        let len = ids.first().map_or(0, Vec::len);
        if mask.len() != batch
            || ids.iter().any(|r| r.len() != len)
            || mask.iter().any(|r| r.len() != len)
        {
            return Err(Stage1Error::Batch(format!(
                "text rows must all have length {len} (ids and mask, {batch} rows)"
            )));
        }
        Ok(Self {
            ids: ids.concat(),
            mask: mask.concat(),
            batch,
            len,
        })
    }

    pub fn ids_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        Tensor::from_data(
            TensorData::new(self.ids.clone(), [self.batch, self.len]),
            device,
        )
    }

    pub fn mask_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        Tensor::from_data(
            TensorData::new(self.mask.clone(), [self.batch, self.len]),
            device,
        )
    }

    /// The rows `rows` (in that order).
    pub fn select(&self, rows: &[usize]) -> Self {
        let mut ids = Vec::with_capacity(rows.len() * self.len);
        let mut mask = Vec::with_capacity(rows.len() * self.len);
        for &r in rows {
            ids.extend_from_slice(&self.ids[r * self.len..(r + 1) * self.len]);
            mask.extend_from_slice(&self.mask[r * self.len..(r + 1) * self.len]);
        }
        Self {
            ids,
            mask,
            batch: rows.len(),
            len: self.len,
        }
    }

    /// Rows of `self` followed by the rows of `others` (same length).
    pub fn concat(parts: &[&TextBatch]) -> Self {
        let len = parts.first().map_or(0, |p| p.len);
        Self {
            ids: parts.iter().flat_map(|p| p.ids.iter().copied()).collect(),
            mask: parts.iter().flat_map(|p| p.mask.iter().copied()).collect(),
            batch: parts.iter().map(|p| p.batch).sum(),
            len,
        }
    }
}

/// `F.cross_entropy(logits, targets, label_smoothing=ε, ignore_index=-100)` with mean reduction:
/// `(1−ε)·NLL + ε/C·(−Σ_c log p_c)`, each averaged over the rows whose target is not
/// [`IGNORE_INDEX`]. `logits [N, C]`, `targets` of length N. Returns `[1]`.
pub fn cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: &[i64],
    smoothing: f64,
) -> Result<Tensor<B, 1>, Stage1Error> {
    let [n, c] = logits.dims();
    if targets.len() != n {
        return Err(Stage1Error::Batch(format!(
            "cross_entropy: {n} rows of logits but {} targets",
            targets.len()
        )));
    }
    if let Some(bad) = targets
        .iter()
        .find(|&&t| t != IGNORE_INDEX && (t < 0 || t >= c as i64))
    {
        return Err(Stage1Error::Batch(format!(
            "cross_entropy: target {bad} out of range for {c} classes"
        )));
    }
    let valid: Vec<f32> = targets
        .iter()
        .map(|&t| if t == IGNORE_INDEX { 0.0 } else { 1.0 })
        .collect();
    let count: f32 = valid.iter().sum();
    let device = logits.device();
    let idx: Vec<i64> = targets.iter().map(|&t| t.max(0)).collect();
    let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(idx, [n, 1]), &device);
    let valid = Tensor::<B, 1>::from_data(TensorData::new(valid, [n]), &device);
    let logp = log_softmax(logits, 1);
    let picked = logp.clone().gather(1, idx).reshape([n]);
    let nll = -(picked * valid.clone()).sum() / count;
    if smoothing == 0.0 {
        return Ok(nll);
    }
    let smooth = -(logp.sum_dim(1).reshape([n]) * valid).sum() / count;
    Ok(nll * (1.0 - smoothing) + smooth * (smoothing / c as f64))
}

/// Gathered features of every rank, for ITC/ITM across data-parallel ranks (`offset` = rank · B is
/// where this rank's samples start). Without it, the local batch plays "all ranks" (one rank).
pub struct Gathered<B: Backend> {
    /// `[N, Q, E]`, no gradient (LAVIS `concat_all_gather`).
    pub image_feats: Tensor<B, 3>,
    /// `[N, E]`, no gradient.
    pub text_feat: Tensor<B, 2>,
    /// `[N, Nv, Dv]` image tokens (LAVIS `all_gather_with_grad`).
    pub image_embeds: Tensor<B, 3>,
    /// Tokens of every rank's texts.
    pub text: TextBatch,
    pub offset: usize,
}

/// The data-parallel gather of [`stage1_losses`]: given this rank's detached ITC features
/// (`image_feats [B, Q, E]`, `text_feat [B, E]`), its image tokens `[B, Nv, Dv]` (with gradient) and
/// its texts, returns every rank's (see [`Gathered`]). Called once per step, after the features exist.
pub type GatherFn<'a, B> = dyn FnMut(
        &Tensor<B, 3>,
        &Tensor<B, 2>,
        &Tensor<B, 3>,
        &TextBatch,
    ) -> Result<Gathered<B>, Stage1Error>
    + 'a;

/// ITC result.
pub struct Itc<B: Backend> {
    /// `[1]`.
    pub loss: Tensor<B, 1>,
    /// `[B, N]`: local images against all texts, `/ temp`.
    pub sim_i2t: Tensor<B, 2>,
    /// `[B, N]`: local texts against all images, `/ temp`.
    pub sim_t2i: Tensor<B, 2>,
}

/// ITC on L2-normalised features (see the module docs). `image_feats_all`/`text_feat_all` are the
/// gathered features (they are detached here); `offset` is this rank's first global index.
#[allow(clippy::too_many_arguments)]
pub fn itc_loss<B: Backend>(
    heads: &QFormerHeads<B>,
    image_feats: Tensor<B, 3>,
    text_feat: Tensor<B, 2>,
    image_feats_all: Tensor<B, 3>,
    text_feat_all: Tensor<B, 2>,
    offset: usize,
    smoothing: f64,
) -> Result<Itc<B>, Stage1Error> {
    let [b, _, _] = image_feats.dims();
    let [n, _] = text_feat_all.dims();
    if offset + b > n || image_feats_all.dims()[0] != n {
        return Err(Stage1Error::Batch(format!(
            "ITC: local batch {b} at offset {offset} does not fit {n} gathered texts / {} images",
            image_feats_all.dims()[0]
        )));
    }
    let (sim_i2t, _) = heads.similarity(image_feats, text_feat_all.detach());
    let (_, sim_t2i) = heads.similarity(image_feats_all.detach(), text_feat);
    let targets: Vec<i64> = (0..b).map(|i| (offset + i) as i64).collect();
    let loss = (cross_entropy(sim_i2t.clone(), &targets, smoothing)?
        + cross_entropy(sim_t2i.clone(), &targets, smoothing)?)
        / 2.0;
    Ok(Itc {
        loss,
        sim_i2t,
        sim_t2i,
    })
}

/// How the ITM hard-negative sampling weights are made from the ITC similarities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NegativeWeights {
    /// salesforce-lavis 1.0.2: `softmax(sim, dim=1) + 1e-4`, then the positive (this rank's diagonal)
    /// set to 0.
    #[default]
    Lavis102,
    /// Later LAVIS: the positive similarity set to −10000, then `softmax(sim, dim=1)`.
    MaskedSoftmax,
}

/// Sampling weights `[B, N]` (row-major) for hard negatives from similarities `sim [B, N]` (host
/// copy, row b = local sample b, its positive at column `offset + b`). No gradient.
pub fn negative_weights(
    sim: &[f32],
    rows: usize,
    cols: usize,
    offset: usize,
    kind: NegativeWeights,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols);
    for b in 0..rows {
        let mut row: Vec<f32> = sim[b * cols..(b + 1) * cols].to_vec();
        let pos = offset + b;
        if kind == NegativeWeights::MaskedSoftmax && pos < cols {
            row[pos] = -10000.0;
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        let mut w: Vec<f32> = exp.iter().map(|&e| e / sum).collect();
        if kind == NegativeWeights::Lavis102 {
            for v in &mut w {
                *v += 1e-4;
            }
            if pos < cols {
                w[pos] = 0.0;
            }
        }
        out.extend(w);
    }
    out
}

/// `torch.multinomial(row, 1)` for each row of `weights [rows, cols]`: an index drawn with
/// probability proportional to its (non-negative) weight. Errors on a row without positive weight
/// (as torch does), e.g. ITM on a batch of one.
pub fn sample_negatives(
    weights: &[f32],
    rows: usize,
    cols: usize,
    rng: &mut dyn RngCore,
) -> Result<Vec<usize>, Stage1Error> {
    let mut out = Vec::with_capacity(rows);
    for b in 0..rows {
        let row = &weights[b * cols..(b + 1) * cols];
        if row.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err(Stage1Error::Batch(format!(
                "ITM hard negatives: row {b} has negative or non-finite weights"
            )));
        }
        let total: f64 = row.iter().map(|&w| w as f64).sum();
        if total <= 0.0 {
            return Err(Stage1Error::Batch(format!(
                "ITM hard negatives: row {b} has no candidate (the batch across ranks needs ≥ 2 samples)"
            )));
        }
        let u = rng.random::<f64>() * total;
        let mut acc = 0.0f64;
        let mut pick = None;
        for (j, &w) in row.iter().enumerate() {
            if w <= 0.0 {
                continue;
            }
            acc += w as f64;
            pick = Some(j);
            if u < acc {
                break;
            }
        }
        // `pick` is the last positive-weight index if rounding left u ≥ acc.
        out.push(pick.unwrap_or(0));
    }
    Ok(out)
}

/// ITM result.
pub struct Itm<B: Backend> {
    /// `[1]`.
    pub loss: Tensor<B, 1>,
    /// `[3B, 2]` for (pos, pos) · B, (text, neg image) · B, (neg text, image) · B.
    pub logits: Tensor<B, 2>,
}

/// ITM with given negatives: `neg_images[b]` = the (global) image paired with local text b,
/// `neg_texts[b]` = the (global) text paired with local image b. `image_embeds [B, Nv, Dv]` local;
/// `image_embeds_all`/`text_all` every rank's (the local ones with one rank).
#[allow(clippy::too_many_arguments)]
pub fn itm_loss<B: Backend>(
    qformer: &Blip2QFormerModel<B>,
    heads: &QFormerHeads<B>,
    image_embeds: Tensor<B, 3>,
    text: &TextBatch,
    image_embeds_all: Tensor<B, 3>,
    text_all: &TextBatch,
    neg_images: &[usize],
    neg_texts: &[usize],
) -> Result<Itm<B>, Stage1Error> {
    let [b, _, _] = image_embeds.dims();
    let n = image_embeds_all.dims()[0];
    if text.batch != b || neg_images.len() != b || neg_texts.len() != b {
        return Err(Stage1Error::Batch(format!(
            "ITM: {b} images, {} texts, {} negative images, {} negative texts",
            text.batch,
            neg_images.len(),
            neg_texts.len()
        )));
    }
    if let Some(bad) = neg_images
        .iter()
        .find(|&&i| i >= n)
        .or_else(|| neg_texts.iter().find(|&&i| i >= text_all.batch))
    {
        return Err(Stage1Error::Batch(format!(
            "ITM: negative index {bad} out of range ({n} images, {} texts)",
            text_all.batch
        )));
    }
    let device = image_embeds.device();
    let idx: Vec<i64> = neg_images.iter().map(|&i| i as i64).collect();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [b]), &device);
    let image_neg = image_embeds_all.select(0, idx);
    let images = Tensor::cat(vec![image_embeds.clone(), image_neg, image_embeds], 0);
    let text_neg = text_all.select(neg_texts);
    let texts = TextBatch::concat(&[text, text, &text_neg]);
    let hidden = qformer.multimodal(
        &images,
        texts.ids_tensor(&device),
        texts.mask_tensor(&device),
    );
    let logits = heads.itm_logits(hidden, qformer.num_query_tokens());
    let labels: Vec<i64> = (0..3 * b).map(|i| i64::from(i < b)).collect();
    let loss = cross_entropy(logits.clone(), &labels, 0.0)?;
    Ok(Itm { loss, logits })
}

/// ITG labels: `decoder ids` with padding → [`IGNORE_INDEX`] (`decoder_input_ids.masked_fill(ids ==
/// pad, -100)`), shifted by one (`labels[:, 1:]`), flattened `[B·(T−1)]`.
pub fn itg_targets(text: &TextBatch, pad_id: i64) -> Vec<i64> {
    let mut out = Vec::with_capacity(text.batch * text.len.saturating_sub(1));
    for r in 0..text.batch {
        for t in 1..text.len {
            let id = text.ids[r * text.len + t];
            out.push(if id == pad_id { IGNORE_INDEX } else { id });
        }
    }
    out
}

/// ITG (see the module docs). `cache` is the query pass's K/V.
pub fn itg_loss<B: Backend>(
    qformer: &Blip2QFormerModel<B>,
    heads: &QFormerHeads<B>,
    cache: &QueryCache<B>,
    text: &TextBatch,
    dec_token_id: i64,
    pad_id: i64,
    smoothing: f64,
) -> Result<Tensor<B, 1>, Stage1Error> {
    let (b, t) = (text.batch, text.len);
    if t < 2 {
        return Err(Stage1Error::Batch(format!(
            "ITG needs texts of ≥ 2 tokens, got {t}"
        )));
    }
    let device = qformer.query_tokens.device();
    let dec_ids = itg_decoder_input_ids(text.ids_tensor::<B>(&device), dec_token_id);
    let hidden = qformer.causal_text_cached(cache, dec_ids, text.mask_tensor(&device));
    let logits = heads.lm_logits(hidden, &qformer.embeddings.word_embeddings);
    let v = logits.dims()[2];
    let shifted = logits
        .slice([0..b, 0..t - 1, 0..v])
        .reshape([b * (t - 1), v]);
    let targets = itg_targets(text, pad_id);
    cross_entropy(shifted, &targets, smoothing)
}

/// Which losses run, and their settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LossOptions {
    pub itc: bool,
    pub itm: bool,
    pub itg: bool,
    pub label_smoothing: f64,
    pub negative_weights: NegativeWeights,
    pub dec_token_id: i64,
    pub pad_token_id: i64,
}

/// Where ITM's negatives come from.
pub enum Negatives<'a> {
    /// Given indices (global): one image per text, one text per image.
    Given {
        images: Vec<usize>,
        texts: Vec<usize>,
    },
    /// Drawn from [`negative_weights`] with this generator (texts' images first, then images' texts,
    /// as LAVIS draws them).
    Sample(&'a mut dyn RngCore),
    /// Drawn from [`negative_weights`] with one generator per local sample (its image's negative
    /// text, then its text's negative image): the draws then do not depend on how the global batch
    /// is split over ranks.
    PerSample(&'a mut [Box<dyn RngCore>]),
}

/// All stage-1 losses of one batch.
pub struct Stage1Losses<B: Backend> {
    /// `[1]`: the sum of the enabled losses.
    pub total: Tensor<B, 1>,
    pub itc: Option<Tensor<B, 1>>,
    pub itm: Option<Tensor<B, 1>>,
    pub itg: Option<Tensor<B, 1>>,
    pub sim_i2t: Option<Tensor<B, 2>>,
    pub sim_t2i: Option<Tensor<B, 2>>,
    pub itm_logits: Option<Tensor<B, 2>>,
    /// The negatives ITM used (images per text, texts per image).
    pub negatives: Option<(Vec<usize>, Vec<usize>)>,
}

/// `Blip2Qformer.forward` after the vision tower: `image_embeds [B, Nv, Dv]` = `ln_vision(ViT(x))`,
/// `text` tokenized with `padding="max_length"`, `truncation`, `max_length = max_txt_len`.
pub fn stage1_losses<B: Backend>(
    qformer: &Blip2QFormerModel<B>,
    heads: &QFormerHeads<B>,
    image_embeds: Tensor<B, 3>,
    text: &TextBatch,
    gather: Option<&mut GatherFn<'_, B>>,
    negatives: Negatives<'_>,
    opts: &LossOptions,
) -> Result<Stage1Losses<B>, Stage1Error> {
    let [b, _, _] = image_embeds.dims();
    if text.batch != b {
        return Err(Stage1Error::Batch(format!(
            "{b} images but {} texts",
            text.batch
        )));
    }
    if !(opts.itc || opts.itm || opts.itg) {
        return Err(Stage1Error::Config(
            "every loss is switched off (itc, itm, itg)".into(),
        ));
    }
    let device = image_embeds.device();
    let mut out = Stage1Losses {
        total: Tensor::zeros([1], &device),
        itc: None,
        itm: None,
        itg: None,
        sim_i2t: None,
        sim_t2i: None,
        itm_logits: None,
        negatives: None,
    };
    // Every loss needs the unimodal query pass (ITC/ITM features, ITG's K/V prefix).
    let (query_hidden, cache) = qformer.query_pass(&image_embeds);
    // ITC features (ITM needs the similarities for its negatives even when ITC is off).
    let mut itc = None;
    let mut gathered: Option<Gathered<B>> = None;
    if opts.itc || opts.itm {
        let image_feats = heads.image_feats(query_hidden);
        let text_hidden = qformer.text_pass(text.ids_tensor(&device), text.mask_tensor(&device));
        let text_feat = heads.text_feat(text_hidden);
        if let Some(f) = gather {
            gathered = Some(f(
                &image_feats.clone().detach(),
                &text_feat.clone().detach(),
                &image_embeds,
                text,
            )?);
        }
        let (img_all, txt_all, offset) = match &gathered {
            Some(g) => (g.image_feats.clone(), g.text_feat.clone(), g.offset),
            None => (image_feats.clone(), text_feat.clone(), 0),
        };
        let r = itc_loss(
            heads,
            image_feats,
            text_feat,
            img_all,
            txt_all,
            offset,
            opts.label_smoothing,
        )?;
        itc = Some(r);
    }
    if let Some(r) = &itc {
        out.sim_i2t = Some(r.sim_i2t.clone());
        out.sim_t2i = Some(r.sim_t2i.clone());
        if opts.itc {
            out.total = out.total + r.loss.clone();
            out.itc = Some(r.loss.clone());
        }
    }
    if opts.itm {
        let r = itc.as_ref().expect("similarities computed for ITM");
        let (img_all, text_all, offset) = match &gathered {
            Some(g) => (g.image_embeds.clone(), g.text.clone(), g.offset),
            None => (image_embeds.clone(), text.clone(), 0),
        };
        let (neg_images, neg_texts) = match negatives {
            Negatives::Given { images, texts } => (images, texts),
            Negatives::Sample(rng) => {
                let n = text_all.batch;
                let (w_t2i, w_i2t) = itm_weights(r, b, n, offset, opts.negative_weights)?;
                let imgs = sample_negatives(&w_t2i, b, n, rng)?;
                let txts = sample_negatives(&w_i2t, b, n, rng)?;
                (imgs, txts)
            }
            Negatives::PerSample(rngs) => {
                if rngs.len() != b {
                    return Err(Stage1Error::Batch(format!(
                        "{} per-sample generators for {b} samples",
                        rngs.len()
                    )));
                }
                let n = text_all.batch;
                let (w_t2i, w_i2t) = itm_weights(r, b, n, offset, opts.negative_weights)?;
                let (mut imgs, mut txts) = (Vec::with_capacity(b), Vec::with_capacity(b));
                for (row, rng) in rngs.iter_mut().enumerate() {
                    let span = row * n..(row + 1) * n;
                    imgs.extend(sample_negatives(&w_t2i[span.clone()], 1, n, rng.as_mut())?);
                    txts.extend(sample_negatives(&w_i2t[span], 1, n, rng.as_mut())?);
                }
                (imgs, txts)
            }
        };
        let m = itm_loss(
            qformer,
            heads,
            image_embeds.clone(),
            text,
            img_all,
            &text_all,
            &neg_images,
            &neg_texts,
        )?;
        out.total = out.total + m.loss.clone();
        out.itm = Some(m.loss);
        out.itm_logits = Some(m.logits);
        out.negatives = Some((neg_images, neg_texts));
    }
    if opts.itg {
        let l = itg_loss(
            qformer,
            heads,
            &cache,
            text,
            opts.dec_token_id,
            opts.pad_token_id,
            opts.label_smoothing,
        )?;
        out.total = out.total + l.clone();
        out.itg = Some(l);
    }
    Ok(out)
}

/// The hard-negative sampling weights of both directions (text → image, image → text), on the host.
fn itm_weights<B: Backend>(
    itc: &Itc<B>,
    b: usize,
    n: usize,
    offset: usize,
    kind: NegativeWeights,
) -> Result<(Vec<f32>, Vec<f32>), Stage1Error> {
    let t2i = host(itc.sim_t2i.clone())?;
    let i2t = host(itc.sim_i2t.clone())?;
    Ok((
        negative_weights(&t2i, b, n, offset, kind),
        negative_weights(&i2t, b, n, offset, kind),
    ))
}

fn host<B: Backend>(t: Tensor<B, 2>) -> Result<Vec<f32>, Stage1Error> {
    t.detach()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| Stage1Error::Batch(format!("reading similarities: {e:?}")))
}
