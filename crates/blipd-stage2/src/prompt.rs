//! Token ids of the stage-2 prompts, and where the subject embeddings go.

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
        tok.encode(caption.trim(), self.max_len)
    }
}
