//! BLIP-Diffusion's text conditioning: the one path that stage-2 training, its sample sheets,
//! subject fine-tuning and generation all take (the sampling loop is [`crate::sampling`]).
//!
//! A prompt batch is a list of [`PromptRow`]s — token ids and the index after which the subject
//! embeddings go (none for a text-only row). [`BlipDiffusionPrompt`] builds the rows: the conditional
//! prompt of the released code (`"a {subject} {prompt}"` repeated, 77 − 16 ids, embeddings after token
//! 2) or of the paper (`"{prompt}, the {subject} is"` + embeddings), the text-only rows of subject
//! dropping, the negative prompt. [`encode_rows`] turns rows and subject embeddings into the U-Net's
//! text states; [`condition`] and [`guided_states`] are the two calls everything else makes.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::ctx_clip_text::{ContextClipTextModel, DEFAULT_CTX_BEGIN_POS, NUM_CTX_TOKENS};
use crate::qformer::Blip2QFormerModel;
use crate::tokenizers::{
    py_strip, BertTokenizer, ClipTokenizer, TextNormalization, TokenBatch, CLIP_MAX_LENGTH,
};
use crate::ModelError;

/// How the subject embeddings enter the CLIP prompt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptTemplate {
    /// The released code's `"a [subject] [prompt]"`, repeated `prompt_reps` times (joined by ", "),
    /// truncated to `max_len − N` tokens, with the N subject embeddings after token `ctx_begin_pos` (2).
    #[default]
    Released,
    /// The paper's `"[text prompt], the [subject text] is [subject prompt]"`: the N subject
    /// embeddings follow the words "…, the dog is".
    Paper,
}

impl PromptTemplate {
    /// The name used in configs and `model_index.json` (`released`, `paper`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Released => "released",
            Self::Paper => "paper",
        }
    }

    /// Inverse of [`Self::name`].
    pub fn from_name(name: &str) -> Result<Self, ModelError> {
        match name {
            "released" => Ok(Self::Released),
            "paper" => Ok(Self::Paper),
            other => Err(ModelError::Invalid(format!(
                "prompt template {other:?}: expected \"released\" or \"paper\""
            ))),
        }
    }
}

/// How a model was trained to read its prompt, as `model_index.json` records it: diffusers'
/// `ctx_begin_pos`, and the keys blipd's stage-2 export adds (`_blipd_prompt_template`,
/// `_blipd_prompt_reps`, `_blipd_subject_text`; diffusers ignores keys starting with `_`). A folder
/// without them (the released weights) reads the released way: the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainedConditioning {
    pub template: PromptTemplate,
    pub prompt_reps: usize,
    pub ctx_begin_pos: usize,
    /// Whether the Q-Former reads the subject's class text beside the image.
    pub subject_text: bool,
}

impl Default for TrainedConditioning {
    fn default() -> Self {
        Self {
            template: PromptTemplate::Released,
            prompt_reps: 20,
            ctx_begin_pos: DEFAULT_CTX_BEGIN_POS,
            subject_text: true,
        }
    }
}

impl TrainedConditioning {
    const TEMPLATE: &'static str = "_blipd_prompt_template";
    const REPS: &'static str = "_blipd_prompt_reps";
    const SUBJECT_TEXT: &'static str = "_blipd_subject_text";
    const CTX_BEGIN_POS: &'static str = "ctx_begin_pos";

    /// Reads a `model_index.json` object; a key of the wrong type is an error naming it.
    pub fn from_index(index: &serde_json::Value) -> Result<Self, ModelError> {
        let d = Self::default();
        let bad = |key: &str, want: &str| {
            ModelError::Invalid(format!("model_index.json: `{key}` is not {want}"))
        };
        let usize_of = |key: &str, default: usize| match index.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| bad(key, "a non-negative integer")),
        };
        Ok(Self {
            template: match index.get(Self::TEMPLATE) {
                None => d.template,
                Some(v) => PromptTemplate::from_name(
                    v.as_str().ok_or_else(|| bad(Self::TEMPLATE, "a string"))?,
                )?,
            },
            prompt_reps: usize_of(Self::REPS, d.prompt_reps)?,
            ctx_begin_pos: usize_of(Self::CTX_BEGIN_POS, d.ctx_begin_pos)?,
            subject_text: match index.get(Self::SUBJECT_TEXT) {
                None => d.subject_text,
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| bad(Self::SUBJECT_TEXT, "true or false"))?,
            },
        })
    }

    /// The `model_index.json` entries that [`Self::from_index`] reads back.
    pub fn index_entries(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert(Self::CTX_BEGIN_POS.into(), self.ctx_begin_pos.into());
        m.insert(Self::TEMPLATE.into(), self.template.name().into());
        m.insert(Self::REPS.into(), self.prompt_reps.into());
        m.insert(Self::SUBJECT_TEXT.into(), self.subject_text.into());
        m
    }

    /// The prompt construction for a text encoder of `max_position_embeddings` positions and
    /// `num_ctx_tokens` subject embeddings.
    pub fn prompt(
        &self,
        num_ctx_tokens: usize,
        max_position_embeddings: usize,
    ) -> BlipDiffusionPrompt {
        BlipDiffusionPrompt {
            template: self.template,
            prompt_reps: self.prompt_reps,
            ctx_begin_pos: self.ctx_begin_pos,
            num_ctx_tokens,
            max_position_embeddings,
            ..BlipDiffusionPrompt::default()
        }
    }
}

/// One prompt of a batch: token ids, and the index after which the subject embeddings are spliced
/// (`None`: a text-only prompt, no embeddings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRow {
    pub ids: Vec<u32>,
    pub ctx_pos: Option<usize>,
}

/// BLIP-Diffusion's prompt construction (LAVIS `_build_prompt` / `_tokenize_text`, diffusers
/// `BlipDiffusionPipeline._build_prompt` / `encode_prompt`), and the paper's template.
#[derive(Debug, Clone, PartialEq)]
pub struct BlipDiffusionPrompt {
    /// Released (default) or paper template.
    pub template: PromptTemplate,
    /// Default 1.0.
    pub prompt_strength: f64,
    /// Default 20.
    pub prompt_reps: usize,
    /// Subject/prompt normalisation (default none, as diffusers).
    pub normalization: TextNormalization,
    /// Subject embeddings spliced into the prompt (16).
    pub num_ctx_tokens: usize,
    /// CLIP text positions (77).
    pub max_position_embeddings: usize,
    /// Token index after which the subject embeddings go in the released template (2).
    pub ctx_begin_pos: usize,
}

impl Default for BlipDiffusionPrompt {
    fn default() -> Self {
        Self {
            template: PromptTemplate::Released,
            prompt_strength: 1.0,
            prompt_reps: 20,
            normalization: TextNormalization::None,
            num_ctx_tokens: NUM_CTX_TOKENS,
            max_position_embeddings: CLIP_MAX_LENGTH,
            ctx_begin_pos: DEFAULT_CTX_BEGIN_POS,
        }
    }
}

impl BlipDiffusionPrompt {
    /// Number of repetitions: Python's `int(prompt_strength * prompt_reps)` (truncation toward zero).
    pub fn repetitions(&self) -> usize {
        let r = self.prompt_strength * self.prompt_reps as f64;
        if r.is_finite() && r > 0.0 {
            r.trunc() as usize
        } else {
            0
        }
    }

    /// Token budget of the conditional prompt: `max_position_embeddings - num_ctx_tokens` (61).
    pub fn cond_max_length(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.num_ctx_tokens)
    }

    /// Normalise a subject string (also what the Q-Former's `cond_subject` should get).
    pub fn normalize(&self, text: &str) -> String {
        self.normalization.apply(text)
    }

    /// The released template's text: `", ".join(["a " + tgt_subject + " " + prompt.strip()] * reps)`
    /// after normalisation.
    pub fn build(&self, prompt: &str, tgt_subject: &str) -> String {
        vec![self.build_one(prompt, tgt_subject); self.repetitions()].join(", ")
    }

    /// One copy of the amplified prompt: `"a " + tgt_subject + " " + prompt.strip()`, normalised.
    fn build_one(&self, prompt: &str, tgt_subject: &str) -> String {
        let prompt = self.normalize(prompt);
        let subject = self.normalize(tgt_subject);
        format!("a {subject} {}", py_strip(&prompt))
    }

    /// The conditional prompt of `prompt` about `subject`: [`Self::cond_max_length`] ids and the
    /// index after which the subject embeddings go. A prompt that does not fit is cut (the released
    /// code cuts silently; here it is reported, see [`truncated_prompts`]).
    pub fn conditional(
        &self,
        tok: &ClipTokenizer,
        prompt: &str,
        subject: &str,
    ) -> Result<PromptRow, ModelError> {
        let budget = self.cond_max_length();
        match self.template {
            PromptTemplate::Released => {
                // The repetitions are meant to fill the budget and be cut; a single copy that does not
                // fit loses part of the prompt itself.
                let one = self.build_one(prompt, subject);
                report_dropped(&one, tok.overflow(&one, budget)?, budget);
                let ids = tok.encode(&self.build(prompt, subject), budget)?;
                Ok(PromptRow {
                    ids,
                    ctx_pos: Some(self.ctx_begin_pos.min(budget)),
                })
            }
            PromptTemplate::Paper => {
                // "[text prompt], the [subject text] is [subject prompt]": the prompt is shortened
                // (from its end) so that the clause naming the subject always survives.
                let prompt = self.normalize(prompt);
                let subject = self.normalize(subject);
                let suffix = tok.tokenize(&format!(", the {} is", subject.trim()))?;
                if suffix.len() + 2 > budget {
                    return Err(ModelError::Tokenizer(format!(
                        "subject clause {subject:?} needs {} tokens, more than the {budget} available",
                        suffix.len() + 2
                    )));
                }
                let mut cap = tok.tokenize(py_strip(&prompt))?;
                let room = budget - 2 - suffix.len();
                report_dropped(&prompt, cap.len().saturating_sub(room), room + 2);
                cap.truncate(room);
                let mut ids = Vec::with_capacity(budget);
                ids.push(tok.bos_id());
                ids.extend_from_slice(&cap);
                ids.extend_from_slice(&suffix);
                let pos = ids.len();
                ids.push(tok.eos_id());
                ids.resize(budget, tok.pad_id());
                Ok(PromptRow {
                    ids,
                    ctx_pos: Some(pos),
                })
            }
        }
    }

    /// The text-only prompt (a dropped sample of stage 2, the text-only comparison of evaluation):
    /// the prompt alone, `max_position_embeddings` ids, no subject embeddings.
    pub fn text_only(&self, tok: &ClipTokenizer, prompt: &str) -> Result<PromptRow, ModelError> {
        let max = self.max_position_embeddings;
        let prompt = py_strip(prompt);
        report_dropped(prompt, tok.overflow(prompt, max)?, max);
        Ok(PromptRow {
            ids: tok.encode(prompt, max)?,
            ctx_pos: None,
        })
    }

    /// The negative prompt's ids (`max_position_embeddings`, no context, not normalised).
    ///
    /// The released pipelines tokenize it with `padding="max_length"` but without truncation, so a
    /// negative prompt over 77 tokens crashes them; here it is truncated to 77 (EOS kept last).
    pub fn negative(&self, tok: &ClipTokenizer, neg_prompt: &str) -> Result<PromptRow, ModelError> {
        let max = self.max_position_embeddings;
        let dropped = tok.overflow(neg_prompt, max)?;
        if dropped > 0 {
            tracing::warn!(
                "negative prompt is {} tokens with BOS and EOS; truncated to {max}: its last {dropped} \
                 token{} are dropped (the reference pipeline would fail)",
                dropped + max,
                if dropped == 1 { "" } else { "s" }
            );
        }
        Ok(PromptRow {
            ids: tok.encode(neg_prompt, max)?,
            ctx_pos: None,
        })
    }

    /// Conditional ids `[B, 61]` for `prompts[i]` with `tgt_subjects[i]` (BOS … EOS, pad = EOS), as
    /// the reference tokenizes them (the rows of [`Self::conditional`]).
    pub fn cond_tokens(
        &self,
        tokenizer: &ClipTokenizer,
        prompts: &[&str],
        tgt_subjects: &[&str],
    ) -> Result<TokenBatch, ModelError> {
        check_lengths(prompts.len(), tgt_subjects.len())?;
        let rows = prompts
            .iter()
            .zip(tgt_subjects)
            .map(|(p, s)| self.conditional(tokenizer, p, s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(token_batch(rows, tokenizer.eos_id()))
    }

    /// Unconditional ids `[batch, 77]` for the negative prompt (the rows of [`Self::negative`]).
    pub fn uncond_tokens(
        &self,
        tokenizer: &ClipTokenizer,
        neg_prompt: &str,
        batch: usize,
    ) -> Result<TokenBatch, ModelError> {
        let row = self.negative(tokenizer, neg_prompt)?;
        Ok(token_batch(vec![row; batch], tokenizer.eos_id()))
    }

    /// The rows of a batch: conditional where `keep[i]` (subject embeddings `i` spliced), text-only
    /// elsewhere (stage 2's subject dropping).
    pub fn rows(
        &self,
        tok: &ClipTokenizer,
        prompts: &[&str],
        subjects: &[&str],
        keep: &[bool],
    ) -> Result<Vec<PromptRow>, ModelError> {
        check_lengths(prompts.len(), subjects.len())?;
        if keep.len() != prompts.len() {
            return Err(ModelError::Invalid(format!(
                "{} keep flags for {} prompts",
                keep.len(),
                prompts.len()
            )));
        }
        (0..prompts.len())
            .map(|i| {
                if keep[i] {
                    self.conditional(tok, prompts[i], subjects[i])
                } else {
                    self.text_only(tok, prompts[i])
                }
            })
            .collect()
    }
}

fn check_lengths(prompts: usize, subjects: usize) -> Result<(), ModelError> {
    if prompts != subjects {
        return Err(ModelError::Tokenizer(format!(
            "{prompts} prompts but {subjects} target subjects"
        )));
    }
    Ok(())
}

/// Rows as a [`TokenBatch`] (attention mask 1 up to and including the first EOS after BOS: the ids
/// the reference tokenizer marks as real).
fn token_batch(rows: Vec<PromptRow>, eos: u32) -> TokenBatch {
    let mut input_ids = Vec::with_capacity(rows.len());
    let mut attention_mask = Vec::with_capacity(rows.len());
    for row in rows {
        let n = row
            .ids
            .iter()
            .skip(1)
            .position(|&i| i == eos)
            .map_or(row.ids.len(), |p| p + 2);
        let mut mask = vec![1u32; n];
        mask.resize(row.ids.len(), 0);
        input_ids.push(row.ids);
        attention_mask.push(mask);
    }
    TokenBatch {
        input_ids,
        attention_mask,
    }
}

/// Text-encoder states `[B, L, D]` of prompt rows: row `i` gets subject embeddings `ctx[i]` (`[B, N,
/// D]`) spliced at its `ctx_pos`, text-only rows none. All rows must come to the same length `L`
/// (ids + N where spliced). The token embeddings of all rows are looked up at once (in training, one
/// gradient table for the text encoder's 49408-row embedding instead of one per prompt).
pub fn encode_rows<B: Backend>(
    text_encoder: &ContextClipTextModel<B>,
    rows: &[PromptRow],
    ctx: Option<Tensor<B, 3>>,
) -> Result<Tensor<B, 3>, ModelError> {
    let b = rows.len();
    if b == 0 {
        return Err(ModelError::Invalid("no prompts to encode".into()));
    }
    let n = match (&ctx, rows.iter().any(|r| r.ctx_pos.is_some())) {
        (Some(c), _) => {
            let [cb, n, _] = c.dims();
            if cb != b {
                return Err(ModelError::Invalid(format!(
                    "{cb} subject embeddings for {b} prompts"
                )));
            }
            n
        }
        (None, true) => {
            return Err(ModelError::Invalid(
                "a conditional prompt without subject embeddings".into(),
            ))
        }
        (None, false) => 0,
    };
    let lens: Vec<usize> = rows
        .iter()
        .map(|r| r.ids.len() + if r.ctx_pos.is_some() { n } else { 0 })
        .collect();
    if lens.iter().any(|&l| l != lens[0]) {
        return Err(ModelError::Invalid(format!(
            "prompt rows of different lengths {lens:?} (ids + subject embeddings)"
        )));
    }
    let device = text_encoder
        .text_model
        .embeddings
        .token_embedding
        .weight
        .val()
        .device();
    let all: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.ids.iter().map(|&i| i as i64))
        .collect();
    let total = all.len();
    let tokens = text_encoder.token_embeddings(Tensor::<B, 2, Int>::from_data(
        TensorData::new(all, [1, total]),
        &device,
    ));
    let width = tokens.dims()[2];
    let mut out = Vec::with_capacity(b);
    let mut start = 0;
    for (i, row) in rows.iter().enumerate() {
        let len = row.ids.len();
        let t = tokens.clone().slice([0..1, start..start + len, 0..width]);
        start += len;
        out.push(match (row.ctx_pos, &ctx) {
            (Some(pos), Some(c)) => {
                let d = c.dims()[2];
                let ci = c.clone().slice([i..i + 1, 0..n, 0..d]);
                text_encoder.embed_tokens(t, Some(ci), pos)?
            }
            _ => text_encoder.embed_tokens(t, None, 0)?,
        });
    }
    Ok(text_encoder.encode_embeds(Tensor::cat(out, 0)))
}

/// The conditioning of a batch: subject embeddings `ctx` `[B, N, D]` spliced into the prompt of row
/// `i` where `keep[i]`, the text-only prompt elsewhere → `[B, L, D]`. Stage-2 training (with its
/// subject dropping), its sample sheets, fine-tuning samples and generation all call this.
pub fn condition<B: Backend>(
    text_encoder: &ContextClipTextModel<B>,
    tokenizer: &ClipTokenizer,
    prompt: &BlipDiffusionPrompt,
    ctx: Tensor<B, 3>,
    prompts: &[&str],
    subjects: &[&str],
    keep: &[bool],
) -> Result<Tensor<B, 3>, ModelError> {
    let rows = prompt.rows(tokenizer, prompts, subjects, keep)?;
    encode_rows(text_encoder, &rows, Some(ctx))
}

/// The states of the negative prompt, `batch` times: `[batch, L, D]`.
pub fn negative_states<B: Backend>(
    text_encoder: &ContextClipTextModel<B>,
    tokenizer: &ClipTokenizer,
    prompt: &BlipDiffusionPrompt,
    neg_prompt: &str,
    batch: usize,
) -> Result<Tensor<B, 3>, ModelError> {
    let row = prompt.negative(tokenizer, neg_prompt)?;
    encode_rows(text_encoder, &vec![row; batch], None)
}

/// With a negative prompt, `[uncond; cond]` (`[2B, L, D]`, classifier-free guidance, as diffusers'
/// `__call__`); without, `cond` (`[B, L, D]`). `cond` is `states` (from [`condition`] or
/// [`encode_rows`]).
pub fn with_negative<B: Backend>(
    text_encoder: &ContextClipTextModel<B>,
    tokenizer: &ClipTokenizer,
    prompt: &BlipDiffusionPrompt,
    states: Tensor<B, 3>,
    neg_prompt: Option<&str>,
) -> Result<Tensor<B, 3>, ModelError> {
    match neg_prompt {
        None => Ok(states),
        Some(neg) => {
            let b = states.dims()[0];
            let uncond = negative_states(text_encoder, tokenizer, prompt, neg, b)?;
            Ok(Tensor::cat(vec![uncond, states], 0))
        }
    }
}

/// BLIP-Diffusion's text conditioning for sampling (diffusers `encode_prompt` + the CFG branch of
/// `__call__`): [`condition`] with every subject kept, then [`with_negative`].
#[allow(clippy::too_many_arguments)]
pub fn guided_states<B: Backend>(
    text_encoder: &ContextClipTextModel<B>,
    tokenizer: &ClipTokenizer,
    prompt: &BlipDiffusionPrompt,
    ctx: Tensor<B, 3>,
    prompts: &[&str],
    subjects: &[&str],
    neg_prompt: Option<&str>,
) -> Result<Tensor<B, 3>, ModelError> {
    let [b, n, _] = ctx.dims();
    if b != prompts.len() || n != prompt.num_ctx_tokens {
        return Err(ModelError::Invalid(format!(
            "BLIP-Diffusion text conditioning: {} prompts with subject embeddings of shape {:?} \
             (expected [{}, {}, D])",
            prompts.len(),
            ctx.dims(),
            prompts.len(),
            prompt.num_ctx_tokens
        )));
    }
    let keep = vec![true; b];
    let cond = condition(
        text_encoder,
        tokenizer,
        prompt,
        ctx,
        prompts,
        subjects,
        &keep,
    )?;
    with_negative(text_encoder, tokenizer, prompt, cond, neg_prompt)
}

/// The subject embeddings `[B, N, D]` of CLIP-normalised subject images `pixels` `[B, 3, S, S]`:
/// ViT → Q-Former queries (reading the subject's class text `subjects[i]` beside them, as the
/// released model does; `None`: the queries alone, the paper's "without subject text" ablation) →
/// projection. Training, fine-tuning's initial embedding and generation all call this.
pub fn subject_embeddings<B: Backend>(
    qformer: &Blip2QFormerModel<B>,
    tokenizer: &BertTokenizer,
    pixels: Tensor<B, 4>,
    subjects: Option<&[&str]>,
) -> Result<Tensor<B, 3>, ModelError> {
    let device = pixels.device();
    let b = pixels.dims()[0];
    let image = qformer.image_embeds(pixels);
    let hidden = match subjects {
        None => qformer.query_pass(&image).0,
        Some(subjects) => {
            if subjects.len() != b {
                return Err(ModelError::Invalid(format!(
                    "{} subject texts for {b} subject images",
                    subjects.len()
                )));
            }
            let toks = tokenizer.encode_batch(subjects)?;
            let mask = toks.mask_tensor::<B>(&device).int();
            qformer.multimodal(&image, toks.ids_tensor::<B>(&device), mask)
        }
    };
    Ok(qformer.project(hidden))
}

/// Truncated prompts so far in this process (all are counted; the first few are shown).
static TRUNCATED: AtomicUsize = AtomicUsize::new(0);
/// How many truncated prompts are named one by one before the rest are only counted.
const SHOWN: usize = 5;

/// Warn that `dropped` tokens of `text` did not fit in `budget` ids (BOS and EOS included): the
/// released code cuts silently; we tell, for the first [`SHOWN`] prompts of a process, then say once
/// that later ones are counted by [`truncated_prompts`].
fn report_dropped(text: &str, dropped: usize, budget: usize) {
    if dropped == 0 {
        return;
    }
    let n = TRUNCATED.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= SHOWN {
        tracing::warn!(
            "prompt {text:?} does not fit in the {budget}-token prompt: its last {dropped} token{} \
             are dropped{}",
            if dropped == 1 { "" } else { "s" },
            if n == SHOWN {
                " (later truncations are counted, not shown)"
            } else {
                ""
            }
        );
    }
}

/// Number of prompts truncated so far in this process.
pub fn truncated_prompts() -> usize {
    TRUNCATED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The truncation counter is process-wide: tests that truncate take turns.
    static COUNTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn tokenizer() -> ClipTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tokenizers/tiny_clip");
        ClipTokenizer::from_dir(&dir).unwrap()
    }

    /// A caption longer than the prompt budget is still encoded to the fixed length, and counted as
    /// truncated; one that fits is not counted.
    #[test]
    fn over_budget_prompts_are_counted() {
        let _turn = COUNTER.lock().unwrap_or_else(|e| e.into_inner());
        let tok = tokenizer();
        let long = vec!["a red dog on the grass"; 30].join(" and ");
        for template in [PromptTemplate::Released, PromptTemplate::Paper] {
            let b = BlipDiffusionPrompt {
                template,
                prompt_reps: 1,
                ..Default::default()
            };
            let before = truncated_prompts();
            let row = b.conditional(&tok, "a dog", "dog").unwrap();
            assert_eq!(row.ids.len(), 61);
            assert_eq!(
                truncated_prompts(),
                before,
                "{template:?}: a short one fits"
            );
            let row = b.conditional(&tok, &long, "dog").unwrap();
            assert_eq!(row.ids.len(), 61);
            assert_eq!(truncated_prompts(), before + 1, "{template:?}");
            assert_eq!(b.text_only(&tok, &long).unwrap().ids.len(), 77);
            assert_eq!(truncated_prompts(), before + 2, "{template:?}");
        }
    }

    /// The paper template puts the embeddings right after "…, the dog is" and keeps that clause when
    /// the prompt is cut; the released one after token `ctx_begin_pos`.
    #[test]
    fn templates_place_the_subject_embeddings() {
        let _turn = COUNTER.lock().unwrap_or_else(|e| e.into_inner());
        let tok = tokenizer();
        let paper = BlipDiffusionPrompt {
            template: PromptTemplate::Paper,
            ..Default::default()
        };
        let row = paper.conditional(&tok, "on the grass", "dog").unwrap();
        let suffix = tok.tokenize(", the dog is").unwrap();
        let pos = row.ctx_pos.unwrap();
        assert_eq!(&row.ids[pos - suffix.len()..pos], &suffix[..]);
        assert_eq!(row.ids[pos], tok.eos_id());
        let long = vec!["on the grass"; 40].join(" ");
        let row = paper.conditional(&tok, &long, "dog").unwrap();
        let pos = row.ctx_pos.unwrap();
        assert_eq!(pos, 60, "cut prompt: BOS + room + clause, then EOS last");
        assert_eq!(&row.ids[pos - suffix.len()..pos], &suffix[..]);
        let released = BlipDiffusionPrompt {
            ctx_begin_pos: 3,
            ..Default::default()
        };
        let row = released.conditional(&tok, "on the grass", "dog").unwrap();
        assert_eq!(row.ctx_pos, Some(3));
        assert_eq!(
            row.ids,
            tok.encode(&released.build("on the grass", "dog"), 61)
                .unwrap()
        );
    }

    /// What the export writes reads back; the released folder's index gives the defaults; a wrong type
    /// is an error naming the key.
    #[test]
    fn trained_conditioning_round_trips_through_the_index() {
        let t = TrainedConditioning {
            template: PromptTemplate::Paper,
            prompt_reps: 3,
            ctx_begin_pos: 4,
            subject_text: false,
        };
        let index = serde_json::Value::Object(t.index_entries());
        assert_eq!(TrainedConditioning::from_index(&index).unwrap(), t);
        let released =
            serde_json::json!({"_class_name": "BlipDiffusionPipeline", "ctx_begin_pos": 2});
        assert_eq!(
            TrainedConditioning::from_index(&released).unwrap(),
            TrainedConditioning::default()
        );
        let e = TrainedConditioning::from_index(&serde_json::json!({"_blipd_subject_text": "no"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("_blipd_subject_text"), "{e}");
    }

    /// `cond_tokens`' attention mask is the tokenizer's (1 through the first EOS).
    #[test]
    fn token_batch_mask_matches_the_tokenizer() {
        let tok = tokenizer();
        let p = BlipDiffusionPrompt {
            prompt_reps: 1,
            ..Default::default()
        };
        let via_rows = p.cond_tokens(&tok, &["on grass"], &["dog"]).unwrap();
        let direct = tok.encode_batch(&["a dog on grass"], 61).unwrap();
        assert_eq!(via_rows, direct);
        let full = BlipDiffusionPrompt::default();
        let via_rows = full.cond_tokens(&tok, &["on grass"], &["dog"]).unwrap();
        let text = full.build("on grass", "dog");
        assert_eq!(via_rows, tok.encode_batch(&[text.as_str()], 61).unwrap());
        let neg = p.uncond_tokens(&tok, "", 2).unwrap();
        assert_eq!(neg, tok.encode_batch(&["", ""], 77).unwrap());
    }
}
