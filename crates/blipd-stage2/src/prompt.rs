//! Token ids of the stage-2 prompts, and where the subject embeddings go.

use std::sync::atomic::{AtomicUsize, Ordering};

use blipd_models::tokenizers::ClipTokenizer;
use blipd_models::ModelError;

use crate::config::PromptTemplate;

/// Builds the CLIP prompt of each training sample.
#[derive(Clone, Debug)]
pub struct PromptBuilder {
    pub template: PromptTemplate,
    pub prompt_reps: usize,
    pub ctx_begin_pos: usize,
    /// Number of subject embeddings (the Q-Former's queries: 16).
    pub num_ctx: usize,
    /// CLIP text positions (77).
    pub max_len: usize,
}

impl PromptBuilder {
    /// Ids of length `max_len − num_ctx` and the index after which the subject embeddings go.
    pub fn conditional(
        &self,
        tok: &ClipTokenizer,
        caption: &str,
        subject: &str,
    ) -> Result<(Vec<u32>, usize), ModelError> {
        let budget = self.max_len.saturating_sub(self.num_ctx);
        match self.template {
            PromptTemplate::Released => {
                let one = format!("a {} {}", subject.trim(), caption.trim());
                report_dropped(&one, tok.overflow(&one, budget)?, budget);
                let text = vec![one; self.prompt_reps].join(", ");
                let ids = tok.encode(&text, budget)?;
                Ok((ids, self.ctx_begin_pos.min(budget)))
            }
            PromptTemplate::Paper => {
                // "[text prompt], the [subject text] is [subject prompt]": the caption is shortened
                // (from its end) so that the clause naming the subject always survives.
                let suffix = tok.tokenize(&format!(", the {} is", subject.trim()))?;
                let mut cap = tok.tokenize(caption.trim())?;
                let room = budget.saturating_sub(2 + suffix.len());
                if suffix.len() + 2 > budget {
                    return Err(ModelError::Tokenizer(format!(
                        "subject clause {:?} needs {} tokens, more than the {budget} available",
                        subject,
                        suffix.len() + 2
                    )));
                }
                report_dropped(caption, cap.len().saturating_sub(room), room + 2);
                cap.truncate(room);
                let mut ids = Vec::with_capacity(budget);
                ids.push(tok.bos_id());
                ids.extend_from_slice(&cap);
                ids.extend_from_slice(&suffix);
                let pos = ids.len();
                ids.push(tok.eos_id());
                ids.resize(budget, tok.pad_id());
                Ok((ids, pos))
            }
        }
    }

    /// The text-only prompt of a dropped sample: the caption alone, `max_len` ids, no embeddings.
    pub fn text_only(&self, tok: &ClipTokenizer, caption: &str) -> Result<Vec<u32>, ModelError> {
        report_dropped(
            caption,
            tok.overflow(caption.trim(), self.max_len)?,
            self.max_len,
        );
        tok.encode(caption.trim(), self.max_len)
    }
}

/// Truncated training prompts so far in this process (all are counted; the first few are shown).
static TRUNCATED: AtomicUsize = AtomicUsize::new(0);
/// How many truncated prompts are named one by one before the rest are only counted.
const SHOWN: usize = 5;

/// Warn that `dropped` tokens of `text` did not fit in `budget` ids (BOS and EOS included): the
/// released code cuts silently; we tell, for the first [`SHOWN`] prompts of a run, then say once
/// that later ones are counted by [`truncated_prompts`].
fn report_dropped(text: &str, dropped: usize, budget: usize) {
    if dropped == 0 {
        return;
    }
    let n = TRUNCATED.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= SHOWN {
        tracing::warn!(
            "caption {text:?} does not fit in the {budget}-token prompt: its last {dropped} token{} \
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

/// Number of training prompts truncated so far in this process.
pub fn truncated_prompts() -> usize {
    TRUNCATED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> ClipTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../blipd-models/tests/fixtures/tokenizers/tiny_clip");
        ClipTokenizer::from_dir(&dir).unwrap()
    }

    /// A caption longer than the prompt budget is still encoded to the fixed length, and counted as
    /// truncated (with the number of tokens dropped); one that fits is not counted.
    #[test]
    fn over_budget_captions_are_counted() {
        let tok = tokenizer();
        let long = vec!["a red dog on the grass"; 30].join(" and ");
        for template in [PromptTemplate::Released, PromptTemplate::Paper] {
            let b = PromptBuilder {
                template,
                prompt_reps: 1,
                ctx_begin_pos: 2,
                num_ctx: 16,
                max_len: 77,
            };
            let before = truncated_prompts();
            let (ids, _) = b.conditional(&tok, "a dog", "dog").unwrap();
            assert_eq!(ids.len(), 61);
            assert_eq!(
                truncated_prompts(),
                before,
                "{template:?}: a short caption fits"
            );
            let (ids, _) = b.conditional(&tok, &long, "dog").unwrap();
            assert_eq!(ids.len(), 61);
            assert_eq!(truncated_prompts(), before + 1, "{template:?}");
            assert_eq!(b.text_only(&tok, &long).unwrap().len(), 77);
            assert_eq!(truncated_prompts(), before + 2, "{template:?}");
            assert!(tok.overflow(&long, 61).unwrap() > 0);
            assert_eq!(tok.overflow("a dog", 61).unwrap(), 0);
        }
    }
}
