//! Subject-driven editing with prompt-to-prompt, as LAVIS does it (`BlipDiffusion.generate_then_edit` and
//! `edit`, `ptp_utils.py`'s `AttentionRefine` + `LocalBlend`; model.md §5.2; paper fig. 4 right, fig. 5 rows 9–10).
//!
//! Two prompts run side by side in one CFG batch `[u_src, u_tgt, c_src, c_tgt]`:
//! - the **source** `"a {src_subject} {prompt}"` (text only), and
//! - the **target** `"a sks … sks {tgt_subject} {prompt}"` (one `sks` per subject embedding) with the
//!   subject embeddings spliced after token 2; the literal `sks` tokens stay in the sequence, so the
//!   token alignment below accounts for the spliced positions.
//!
//! In every U-Net forward the [`Refine`] controller ([`AttentionHook`]) edits the conditional target row's
//! attention: cross-attention becomes the source's, gathered through a Needleman–Wunsch alignment of the
//! two prompts' CLIP ids where a target token aligns (its own elsewhere), for the first
//! `⌊cross·(N+1)⌋` steps; self-attention becomes the source's for steps `[0, ⌊self·N⌋)` in layers of at
//! most 16² query pixels. After every scheduler step, **LocalBlend** builds a mask from the source
//! subject word's cross-attention maps (the 16×16 layers at 512², summed over steps, mean over heads
//! and layers, 3×3 max-pool, nearest upsample, divided by the max, `> threshold`) and keeps the source
//! latents outside it: `x_tgt ← x_src + M·(x_tgt − x_src)`.
//!
//! Generated source ([`generate_then_edit`] with PNDM): both rows start from one latent. A real photo
//! ([`ddim_invert`], then [`generate_then_edit`] with DDIM and `inverted = true`): the photo's latent is
//! DDIM-inverted (guidance 1, SD-1.5's DDIM config), and the source row then steps with its unguided
//! conditional noise so it reconstructs the photo.
//!
//! Where LAVIS hard-codes SD-1.5 at 512² (`down_cross[2:4] + up_cross[:3]` reshaped to 16×16) the blend
//! layers here are the down/up cross-attention layers whose query grid is [`RefineConfig::blend_grid`]²
//! (default: the latent side / 4, which selects exactly those five layers at 512²).

use blipd_models::conditioning::{encode_rows, PromptRow};
use blipd_models::sampling::{self, Edit, Steps};
use blipd_models::schedulers::{DdimScheduler, DdimSchedulerConfig, PndmScheduler};
use blipd_models::tokenizers::ClipTokenizer;
use blipd_models::unet::{AttentionHook, AttentionSite, UNetPlace};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::preprocess::{resize_shorter_center_crop, PilResample, RgbImage};
use crate::{AppError, BlipDiffusionPipeline, GenerateOutput};

/// LAVIS `_CTX_BEGIN_POS`: the subject embeddings follow `[BOS] a`.
pub const CTX_BEGIN_POS: usize = 2;

/// How an edit runs (LAVIS's defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefineConfig {
    /// Fraction of steps with cross-attention replacement (LAVIS 0.8: steps `< ⌊0.8·(N+1)⌋`).
    pub cross_replace_steps: f64,
    /// Fraction of steps with self-attention replacement (LAVIS 0.4: steps `< ⌊0.4·N⌋`).
    pub self_replace_steps: f64,
    /// Self-attention is replaced only in layers of at most this many query pixels (LAVIS 16²).
    pub self_replace_max_pixels: usize,
    /// LocalBlend threshold on the normalised map (LAVIS `lb_threshold` 0.3; its try-on notebook 0.15).
    pub threshold: f64,
    /// Side of the query grid of the blend layers (default: latent side / 4, i.e. 16 at 512²).
    pub blend_grid: Option<usize>,
}

impl Default for RefineConfig {
    fn default() -> Self {
        Self {
            cross_replace_steps: 0.8,
            self_replace_steps: 0.4,
            self_replace_max_pixels: 16 * 16,
            threshold: 0.3,
            blend_grid: None,
        }
    }
}

impl RefineConfig {
    pub fn validate(&self) -> Result<(), AppError> {
        for (name, v) in [
            ("cross-replace steps", self.cross_replace_steps),
            ("self-replace steps", self.self_replace_steps),
            ("threshold", self.threshold),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(AppError::Request(format!(
                    "{name} must be in [0, 1], got {v}"
                )));
            }
        }
        if self.blend_grid == Some(0) {
            return Err(AppError::Request(
                "the blend grid must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// LAVIS `_build_prompts_edit`: `["a {src} {prompt}", "a sks…sks {tgt} {prompt}"]`.
pub fn edit_prompts(
    num_query: usize,
    src_subject: &str,
    tgt_subject: &str,
    prompt: &str,
) -> [String; 2] {
    let placeholder = vec!["sks"; num_query].join(" ");
    [
        format!("a {src_subject} {prompt}"),
        format!("a {placeholder} {tgt_subject} {prompt}"),
    ]
}

/// Global alignment of two id sequences (Needleman–Wunsch with gap 0, match +1, mismatch −1, ties
/// broken left, up, diagonal as LAVIS `global_align`): for each `y` token the index of the `x` token it
/// aligns with, or −1.
pub fn align(x: &[u32], y: &[u32]) -> Vec<i64> {
    let (n, m) = (x.len(), y.len());
    let mut score = vec![vec![0i32; m + 1]; n + 1];
    let mut trace = vec![vec![0u8; m + 1]; n + 1];
    for t in trace[0].iter_mut().skip(1) {
        *t = 1;
    }
    for row in trace.iter_mut().skip(1) {
        row[0] = 2;
    }
    trace[0][0] = 4;
    for i in 1..=n {
        for j in 1..=m {
            let left = score[i][j - 1];
            let up = score[i - 1][j];
            let diag = score[i - 1][j - 1] + if x[i - 1] == y[j - 1] { 1 } else { -1 };
            let best = left.max(up).max(diag);
            score[i][j] = best;
            trace[i][j] = if best == left {
                1
            } else if best == up {
                2
            } else {
                3
            };
        }
    }
    let (mut i, mut j) = (n, m);
    let mut out = Vec::with_capacity(m);
    while i > 0 || j > 0 {
        match trace[i][j] {
            3 => {
                i -= 1;
                j -= 1;
                out.push(i as i64);
            }
            1 => {
                j -= 1;
                out.push(-1);
            }
            2 => i -= 1,
            _ => break,
        }
    }
    out.reverse();
    out
}

/// `[BOS] tokens [EOS]` without padding or truncation (transformers' `tokenizer.encode`).
fn encode_full(tok: &ClipTokenizer, text: &str) -> Result<Vec<u32>, AppError> {
    let mut ids = vec![tok.bos_id()];
    ids.extend(tok.tokenize(text)?);
    ids.push(tok.eos_id());
    Ok(ids)
}

/// LAVIS `get_mapper`: for each of the `max_len` key positions of the target prompt, the source position
/// whose attention it takes, and whether it takes it (alpha 1) or keeps its own (0, unaligned tokens).
pub fn refinement_mapper(
    tok: &ClipTokenizer,
    src: &str,
    tgt: &str,
    max_len: usize,
) -> Result<(Vec<i64>, Vec<f32>), AppError> {
    let (x, y) = (encode_full(tok, src)?, encode_full(tok, tgt)?);
    if y.len() > max_len || x.len() > max_len {
        return Err(AppError::Request(format!(
            "the edit prompts are {} and {} tokens; at most {max_len} fit (shorten --prompt)",
            x.len(),
            y.len()
        )));
    }
    let base = align(&x, &y);
    let mut mapper: Vec<i64> = (0..max_len as i64).collect();
    let mut alphas = vec![1f32; max_len];
    for (k, &b) in base.iter().enumerate() {
        mapper[k] = b;
        alphas[k] = if b == -1 { 0.0 } else { 1.0 };
    }
    Ok((mapper, alphas))
}

/// LAVIS `get_word_inds`: the token positions (1-based, after BOS) of every occurrence of `word` among
/// the space-separated words of `text`, found by walking the decoded tokens' lengths.
pub fn word_inds(tok: &ClipTokenizer, text: &str, word: &str) -> Result<Vec<usize>, AppError> {
    let split: Vec<&str> = text.split(' ').collect();
    let places: Vec<usize> = (0..split.len()).filter(|&i| split[i] == word).collect();
    let mut out = Vec::new();
    if places.is_empty() {
        return Ok(out);
    }
    let ids = encode_full(tok, text)?;
    let (mut cur, mut ptr) = (0usize, 0usize);
    for (i, &id) in ids[1..ids.len() - 1].iter().enumerate() {
        cur += tok.decode(&[id], false)?.trim_matches('#').chars().count();
        if places.contains(&ptr) {
            out.push(i + 1);
        }
        if ptr < split.len() && cur >= split[ptr].chars().count() {
            ptr += 1;
            cur = 0;
        }
    }
    Ok(out)
}

/// The prompt-to-prompt controller: `AttentionRefine` with a `LocalBlend`, on the CFG batch
/// `[u_src, u_tgt, c_src, c_tgt]`.
pub struct Refine<B: Backend> {
    cfg: RefineConfig,
    grid: usize,
    step: usize,
    cross_until: usize,
    self_range: (usize, usize),
    /// `[max_len]` source key index per target key (−1 → the last, with alpha 0).
    mapper: Tensor<B, 1, Int>,
    /// `[1, 1, max_len]`.
    alphas: Tensor<B, 3>,
    /// `[1, 1, max_len]`: 1 at the source subject word's tokens.
    word_alpha: Tensor<B, 3>,
    max_len: usize,
    step_maps: Vec<Tensor<B, 3>>,
    store: Vec<Tensor<B, 3>>,
    mask: Option<Tensor<B, 2>>,
}

impl<B: Backend> Refine<B> {
    /// For `prompts` ([`edit_prompts`]), the source subject word, `num_steps` (LAVIS's
    /// `num_inference_steps`) and latents of side `latent_side` (for the default blend grid).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tok: &ClipTokenizer,
        prompts: &[String; 2],
        src_word: &str,
        num_steps: usize,
        latent_side: usize,
        max_len: usize,
        cfg: RefineConfig,
        device: &B::Device,
    ) -> Result<Self, AppError> {
        cfg.validate()?;
        let (mapper, alphas) = refinement_mapper(tok, &prompts[0], &prompts[1], max_len)?;
        let inds = word_inds(tok, &prompts[0], src_word)?;
        if inds.is_empty() {
            return Err(AppError::Request(format!(
                "the source subject {src_word:?} is not a single word of the source prompt {:?}: \
                 LocalBlend looks it up by word (use one word, e.g. \"cat\")",
                prompts[0]
            )));
        }
        let mut w = vec![0f32; max_len];
        for i in inds {
            if i < max_len {
                w[i] = 1.0;
            }
        }
        let mapper: Vec<i64> = mapper
            .into_iter()
            .map(|m| if m < 0 { max_len as i64 + m } else { m })
            .collect();
        let grid = cfg.blend_grid.unwrap_or((latent_side / 4).max(1));
        Ok(Self {
            cross_until: (cfg.cross_replace_steps * (num_steps + 1) as f64) as usize,
            self_range: (0, (num_steps as f64 * cfg.self_replace_steps) as usize),
            grid,
            cfg,
            step: 0,
            mapper: Tensor::from_data(TensorData::new(mapper, [max_len]), device),
            alphas: Tensor::from_data(TensorData::new(alphas, [1, 1, max_len]), device),
            word_alpha: Tensor::from_data(TensorData::new(w, [1, 1, max_len]), device),
            max_len,
            step_maps: Vec::new(),
            store: Vec::new(),
            mask: None,
        })
    }

    /// The last LocalBlend mask `[h, w]` (1 inside), if a step ran.
    pub fn mask(&self) -> Option<Tensor<B, 2>> {
        self.mask.clone()
    }

    /// Steps (U-Net forwards) seen so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// `⌊cross·(N+1)⌋` and `[0, ⌊self·N⌋)`.
    pub fn bounds(&self) -> (usize, (usize, usize)) {
        (self.cross_until, self.self_range)
    }

    /// LocalBlend's mask `[h, w]` from the stored source maps.
    fn blend_mask(&self, h: usize, w: usize) -> Tensor<B, 2> {
        let g = self.grid;
        let device = self.mapper.device();
        // [H, g², L] per layer → (× word alphas).sum(L) → [H, g²]; all layers' heads → mean.
        let maps: Vec<Tensor<B, 2>> = self
            .store
            .iter()
            .map(|m| {
                (m.clone() * self.word_alpha.clone())
                    .sum_dim(2)
                    .squeeze_dim(2)
            })
            .collect();
        let map = Tensor::cat(maps, 0).mean_dim(0); // [1, g²]
        let v: Vec<f32> = map
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        // 3×3 max-pool, stride 1, padding 1 (−∞ outside).
        let mut pooled = vec![f32::NEG_INFINITY; g * g];
        for y in 0..g {
            for x in 0..g {
                let mut m = f32::NEG_INFINITY;
                for dy in -1i64..=1 {
                    for dx in -1i64..=1 {
                        let (yy, xx) = (y as i64 + dy, x as i64 + dx);
                        if yy >= 0 && xx >= 0 && (yy as usize) < g && (xx as usize) < g {
                            m = m.max(v[yy as usize * g + xx as usize]);
                        }
                    }
                }
                pooled[y * g + x] = m;
            }
        }
        // Nearest upsample (PyTorch: src = ⌊dst · in/out⌋), divide by the max, threshold.
        let mut up = vec![0f32; h * w];
        let (sy, sx) = (g as f32 / h as f32, g as f32 / w as f32);
        for y in 0..h {
            let iy = ((y as f32 * sy).floor() as usize).min(g - 1);
            for x in 0..w {
                let ix = ((x as f32 * sx).floor() as usize).min(g - 1);
                up[y * w + x] = pooled[iy * g + ix];
            }
        }
        let max = up.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let thr = self.cfg.threshold as f32;
        let mask: Vec<f32> = up
            .iter()
            .map(|&u| if u / max > thr { 1.0 } else { 0.0 })
            .collect();
        Tensor::from_data(TensorData::new(mask, [h, w]), &device)
    }
}

impl<B: Backend> Refine<B> {
    /// A LocalBlend layer: a down/up cross-attention layer with a `grid × grid` query grid.
    fn stores(&self, site: &AttentionSite) -> bool {
        site.is_cross
            && site.place != UNetPlace::Mid
            && site.height == self.grid
            && site.width == self.grid
    }

    /// Whether the target row's probabilities are replaced at this layer in the current step.
    fn edits(&self, site: &AttentionSite) -> bool {
        if site.is_cross {
            self.step < self.cross_until
        } else {
            let (lo, hi) = self.self_range;
            lo <= self.step
                && self.step < hi
                && site.query_pixels() <= self.cfg.self_replace_max_pixels
        }
    }
}

impl<B: Backend> AttentionHook<B> for Refine<B> {
    /// Layers neither stored nor edited (at 512²: the 64×64 self-attention, whose probabilities would
    /// be 2 GiB per call for the CFG batch, and every layer once the replacement steps are over) run
    /// the fused kernel; their target row is what LAVIS computes there unchanged.
    fn wants(&self, site: &AttentionSite) -> bool {
        self.stores(site) || self.edits(site)
    }

    fn on_attention(&mut self, site: &AttentionSite, probs: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, heads, q, k] = probs.dims();
        assert_eq!(
            b, 4,
            "prompt-to-prompt expects the CFG batch [u_src, u_tgt, c_src, c_tgt]"
        );
        let src = probs.clone().narrow(0, 2, 1).squeeze_dim::<3>(0); // [H, q, k]
        if self.stores(site) {
            self.step_maps.push(src.clone());
        }
        if !self.edits(site) {
            return probs;
        }
        let new_tgt = if site.is_cross {
            assert_eq!(k, self.max_len, "cross-attention over {k} keys");
            let tgt = probs.clone().narrow(0, 3, 1).squeeze_dim::<3>(0);
            let gathered = src.select(2, self.mapper.clone());
            let a = self.alphas.clone();
            gathered * a.clone() + tgt * (a.neg() + 1.0)
        } else {
            src
        };
        Tensor::cat(
            vec![probs.narrow(0, 0, 3), new_tgt.reshape([1, heads, q, k])],
            0,
        )
    }

    fn forward_done(&mut self, _layers: usize) {
        self.step += 1;
        let maps = std::mem::take(&mut self.step_maps);
        if self.store.is_empty() {
            self.store = maps;
        } else {
            assert_eq!(
                maps.len(),
                self.store.len(),
                "blend layers changed between steps"
            );
            self.store = self.store.drain(..).zip(maps).map(|(s, m)| s + m).collect();
        }
    }

    fn step_callback(&mut self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, _, h, w] = latents.dims();
        assert_eq!(n, 2, "prompt-to-prompt steps [source, target] latents");
        if self.store.is_empty() {
            return latents;
        }
        let mask = self.blend_mask(h, w);
        self.mask = Some(mask.clone());
        let m = mask.reshape([1, 1, h, w]);
        let src = latents.clone().narrow(0, 0, 1);
        src.clone() + m * (latents - src)
    }
}

/// What an edit gives: both rows' final latents `[2, C, h, w]` and images `[2, 3, H, W]` in `[0, 1]`
/// (source, edit), the last LocalBlend mask `[h, w]` (1 where the edit is kept), and the two prompts.
#[derive(Debug)]
pub struct EditOutput<B: Backend> {
    pub output: GenerateOutput<B>,
    pub mask: Tensor<B, 2>,
    pub prompts: [String; 2],
}

/// The inputs of [`generate_then_edit`].
pub struct EditRequest<'a, B: Backend> {
    /// Subject embeddings `[1, N, D]` of the reference (or a fine-tuned cache).
    pub ctx: Tensor<B, 3>,
    /// The word naming the subject in the source prompt ("cat").
    pub src_subject: &'a str,
    /// The target subject's class ("dog").
    pub tgt_subject: &'a str,
    pub prompt: &'a str,
    pub neg_prompt: &'a str,
    pub steps: usize,
    pub guidance_scale: f64,
    pub refine: RefineConfig,
}

/// Text states `[u, u, src, tgt]` `[4, L, D]` of an edit (LAVIS `generate_then_edit`).
pub fn edit_states<B: Backend>(
    pipe: &BlipDiffusionPipeline<B>,
    prompts: &[String; 2],
    ctx: Tensor<B, 3>,
    neg_prompt: &str,
) -> Result<Tensor<B, 3>, AppError> {
    let tok = &pipe.tokenizer;
    let max = pipe.text_encoder.max_position_embeddings;
    let [_, n, d] = ctx.dims();
    let neg = tok.encode(neg_prompt, max)?;
    let rows = vec![
        PromptRow {
            ids: neg.clone(),
            ctx_pos: None,
        },
        PromptRow {
            ids: neg,
            ctx_pos: None,
        },
        PromptRow {
            ids: tok.encode(&prompts[0], max)?,
            ctx_pos: None,
        },
        PromptRow {
            ids: tok.encode(&prompts[1], max.saturating_sub(n))?,
            ctx_pos: Some(CTX_BEGIN_POS),
        },
    ];
    Ok(encode_rows(
        &pipe.text_encoder,
        &rows,
        Some(ctx.expand([4, n, d])),
    )?)
}

/// Prompt-to-prompt editing from `latents` `[1, C, h, w]`: PNDM from a shared noise latent (a
/// generated source, LAVIS `generate_then_edit`), or DDIM from a [`ddim_invert`]ed photo
/// (`inverted`, LAVIS `edit`), the source row then stepping with its unguided conditional noise.
pub fn generate_then_edit<B: Backend>(
    pipe: &BlipDiffusionPipeline<B>,
    req: &EditRequest<'_, B>,
    latents: Tensor<B, 4>,
    inverted: bool,
) -> Result<EditOutput<B>, AppError> {
    if !sampling::guided(req.guidance_scale) {
        return Err(AppError::Request(format!(
            "editing needs classifier-free guidance (scale > 1), got {}",
            req.guidance_scale
        )));
    }
    if req.steps == 0 {
        return Err(AppError::Request("editing needs at least one step".into()));
    }
    let [lb, _, h, w] = latents.dims();
    if lb != 1 {
        return Err(AppError::Request(format!(
            "one initial latent expected, got {lb}"
        )));
    }
    let n = req.ctx.dims()[1];
    let prompts = edit_prompts(n, req.src_subject, req.tgt_subject, req.prompt);
    let max = pipe.text_encoder.max_position_embeddings;
    let mut ctl = Refine::new(
        &pipe.tokenizer,
        &prompts,
        req.src_subject,
        req.steps,
        h.min(w),
        max,
        req.refine.clone(),
        &pipe.device,
    )?;
    let states = edit_states(pipe, &prompts, req.ctx.clone(), req.neg_prompt)?;
    let steps = if inverted {
        let mut s = DdimScheduler::new(DdimSchedulerConfig::sd15())?;
        s.set_timesteps(req.steps)?;
        Steps::Ddim(s)
    } else {
        let mut s = PndmScheduler::<B>::blip_diffusion();
        s.set_timesteps(req.steps)?;
        Steps::Pndm(s)
    };
    let x = latents.repeat_dim(0, 2);
    let out = sampling::denoise_with(
        &pipe.unet,
        None,
        steps,
        x,
        states,
        req.guidance_scale,
        Edit {
            controller: Some(&mut ctl),
            unguided_rows: usize::from(inverted),
        },
        &mut |_| {},
    )?;
    let mask = ctl
        .mask()
        .ok_or_else(|| AppError::Request(format!(
            "no cross-attention layer of the U-Net has a {g}×{g} query grid for LocalBlend (set the blend grid, --blend-grid)",
            g = ctl.grid
        )))?;
    let images = pipe.decode(out.clone());
    Ok(EditOutput {
        output: GenerateOutput {
            images,
            latents: out,
        },
        mask,
        prompts,
    })
}

/// LAVIS `_ddim_inverse`: `latents` `[1, C, h, w]` of a photo → noise, by `steps` DDIM inversion steps
/// (SD-1.5's DDIM config, guidance 1) on the text-only prompt LAVIS builds, `"a {c} {prompt}"` where
/// `c` is the **first character** of the source subject (LAVIS zips the prompt list with the subject
/// string; kept so results match it). Returns the inverted latents and that prompt.
pub fn ddim_invert<B: Backend>(
    pipe: &BlipDiffusionPipeline<B>,
    latents: Tensor<B, 4>,
    src_subject: &str,
    prompt: &str,
    steps: usize,
) -> Result<(Tensor<B, 4>, String), AppError> {
    if steps == 0 {
        return Err(AppError::Request(
            "inversion needs at least one step".into(),
        ));
    }
    let first: String = src_subject.chars().take(1).collect();
    let text = format!("a {first} {}", blipd_models::tokenizers::py_strip(prompt));
    let max = pipe.text_encoder.max_position_embeddings;
    let row = PromptRow {
        ids: pipe.tokenizer.encode(&text, max)?,
        ctx_pos: None,
    };
    let states = encode_rows(&pipe.text_encoder, &[row], None)?;
    let mut sched = DdimScheduler::new(DdimSchedulerConfig::sd15())?;
    sched.set_timesteps(steps)?;
    let mut x = latents;
    for t in sched.inversion_timesteps() {
        let tt = Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32], [1]), &pipe.device);
        let eps = pipe.unet.forward(x.clone(), tt, states.clone(), None);
        x = sched.inversion_step(eps, t, x)?;
    }
    Ok((x, text))
}

/// A photo's latent `[1, C, S/f, S/f]` as LAVIS `edit` makes it: torchvision `Resize(S)` (bilinear) +
/// `CenterCrop(S)` + `ToTensor`, `2x − 1`, the VAE's posterior **sampled** (LAVIS leaves the noise
/// unseeded; here it comes from Burn's RNG seeded with `seed`) × the scaling factor.
pub fn photo_latents<B: Backend>(
    pipe: &BlipDiffusionPipeline<B>,
    photo: &RgbImage,
    size: usize,
    seed: u64,
) -> Result<Tensor<B, 4>, AppError> {
    let f = pipe.latent_factor();
    if size == 0 || !size.is_multiple_of(f) {
        return Err(AppError::Request(format!(
            "the photo size {size} must be a positive multiple of the VAE's factor {f}"
        )));
    }
    let img = resize_shorter_center_crop(photo, size, PilResample::Bilinear)?;
    let plane = size * size;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * plane + i] = 2.0 * (f32::from(px[c]) / 255.0) - 1.0;
        }
    }
    let x = Tensor::<B, 4>::from_data(TensorData::new(chw, [1, 3, size, size]), &pipe.device);
    let posterior = pipe.vae.encode(x);
    B::seed(&pipe.device, seed);
    let shape = pipe.latent_shape(1, size, size);
    let noise = Tensor::random(
        shape,
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &pipe.device,
    );
    Ok(posterior.sample(noise) * pipe.vae.scaling_factor)
}
