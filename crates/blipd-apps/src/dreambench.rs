//! Zero-shot DreamBench generation: every subject × prompt × sample, written in the layout
//! [`crate::eval`] scores (`<out>/<subject>/<prompt index>_<sample index>.png`).
//!
//! Choices (documented in docs/eval.md):
//! - the reference image is the subject's first photo (file-name order): BLIP-Diffusion is zero-shot and
//!   takes one subject image; a fine-tuned pipeline (with a cached subject embedding) uses its cache
//!   instead, so give it only its own subject (`subjects`);
//! - the Q-Former's subject text is the class noun;
//! - a DreamBooth template `"<pre>{0} {1}<post>"` becomes the pipeline's target subject `"<adjectives>
//!   <class>"` (the words of `<pre>` after its article) and prompt `<post>`, so the pipeline's
//!   `"a {subject} {prompt}"` reads exactly like the rendered template: `"a red {0} {1}"` → subject
//!   `"red backpack"`, prompt `""`; `"a {0} {1} in the jungle"` → `"backpack"`, `"in the jungle"`;
//! - sample `k` of prompt `p` of the `s`-th subject starts from the latents of seed
//!   `seed + 1_000_000·s + 1_000·p` (the `k` samples of a prompt are one batch), so a rerun makes the
//!   same images and a partly written folder is completed without redoing what exists.

use std::path::{Path, PathBuf};

use burn::prelude::*;

use crate::eval::{render_prompt, DreamBench, DreamBenchSubject};
use crate::generate::{BlipDiffusionPipeline, GenerateOptions};
use crate::preprocess::RgbImage;
use crate::AppError;

/// What to generate.
#[derive(Debug, Clone)]
pub struct DreamBenchGenOptions {
    /// Only these subjects (empty: all).
    pub subjects: Vec<String>,
    /// The first N prompts of each subject's list (`None`: all 25).
    pub prompts_per_subject: Option<usize>,
    /// Samples per prompt (DreamBooth's protocol: 4).
    pub images_per_prompt: usize,
    /// Sampler settings; `seed` is the base seed.
    pub generate: GenerateOptions,
}

impl Default for DreamBenchGenOptions {
    fn default() -> Self {
        Self {
            subjects: Vec::new(),
            prompts_per_subject: None,
            images_per_prompt: 4,
            generate: GenerateOptions::default(),
        }
    }
}

/// Progress of [`generate_dreambench`].
#[derive(Debug, Clone)]
pub enum GenEvent {
    /// Before the first image: how many images the request covers.
    Planned { images: usize },
    /// A prompt's images were written (`skipped`: they were all there already).
    Prompt {
        subject: String,
        prompt: String,
        images: usize,
        skipped: bool,
    },
}

/// Summary of a [`generate_dreambench`] call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenSummary {
    pub written: usize,
    pub skipped: usize,
}

/// `(target subject, prompt)` for the pipeline from a DreamBooth template (see the module docs).
pub fn pipeline_prompt(template: &str, class_name: &str) -> (String, String) {
    if let Some(at) = template.find("{0} {1}") {
        let pre = template[..at].trim();
        let post = template[at + "{0} {1}".len()..].trim();
        let adjectives = pre
            .strip_prefix("a ")
            .or_else(|| pre.strip_prefix("an "))
            .or_else(|| matches!(pre, "" | "a" | "an").then_some(""));
        if let Some(adj) = adjectives {
            let subject = format!("{} {class_name}", adj.trim());
            return (subject.trim().to_string(), post.to_string());
        }
    }
    // Any other shape: the class as the subject and the whole rendered sentence as the prompt.
    (
        class_name.to_string(),
        render_prompt(template, None, class_name),
    )
}

fn selected<'a>(
    bench: &'a DreamBench,
    names: &[String],
) -> Result<Vec<(usize, &'a DreamBenchSubject)>, AppError> {
    for n in names {
        if bench.subject(n).is_none() {
            return Err(AppError::Request(format!(
                "subject {n:?} is not in DreamBench {}",
                bench.root.display()
            )));
        }
    }
    Ok(bench
        .subjects
        .iter()
        .enumerate()
        .filter(|(_, s)| names.is_empty() || names.contains(&s.name))
        .collect())
}

/// Path of sample `k` of prompt `p` of `subject`.
pub fn image_path(out: &Path, subject: &str, p: usize, k: usize) -> PathBuf {
    out.join(subject).join(format!("{p}_{k}.png"))
}

/// Generates the requested DreamBench images into `out` (see the module docs); images already there
/// are kept.
pub fn generate_dreambench<B: Backend>(
    pipe: &BlipDiffusionPipeline<B>,
    bench: &DreamBench,
    opts: &DreamBenchGenOptions,
    out: &Path,
    on_event: &mut dyn FnMut(GenEvent),
) -> Result<GenSummary, AppError> {
    let k = opts.images_per_prompt;
    if k == 0 {
        return Err(AppError::Request(
            "images_per_prompt must be at least 1".into(),
        ));
    }
    let subjects = selected(bench, &opts.subjects)?;
    let n_prompts = |s: &DreamBenchSubject| {
        let n = bench.templates(s).len();
        opts.prompts_per_subject.map_or(n, |m| m.min(n))
    };
    on_event(GenEvent::Planned {
        images: subjects.iter().map(|(_, s)| n_prompts(s) * k).sum(),
    });
    let mut summary = GenSummary::default();
    for (si, subject) in subjects {
        // A fine-tuned pipeline brings its subject embedding; otherwise the subject's first photo.
        let pixels = match pipe.ctx_cache {
            Some(_) => None,
            None => {
                let reference = subject.images.first().ok_or_else(|| {
                    AppError::Request(format!("subject {} has no photo", subject.name))
                })?;
                Some(pipe.preprocess(&RgbImage::open(reference)?, opts.generate.reference_resize)?)
            }
        };
        let dir = out.join(&subject.name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| AppError::Request(format!("creating {}: {e}", dir.display())))?;
        for (p, template) in bench.templates(subject)[..n_prompts(subject)]
            .iter()
            .enumerate()
        {
            let (tgt, prompt) = pipeline_prompt(template, &subject.class_name);
            let shown = render_prompt(template, None, &subject.class_name);
            let paths: Vec<PathBuf> = (0..k)
                .map(|j| image_path(out, &subject.name, p, j))
                .collect();
            if paths.iter().all(|q| q.is_file()) {
                summary.skipped += k;
                on_event(GenEvent::Prompt {
                    subject: subject.name.clone(),
                    prompt: shown,
                    images: k,
                    skipped: true,
                });
                continue;
            }
            let mut g = opts.generate.clone();
            g.seed = opts
                .generate
                .seed
                .wrapping_add(1_000_000 * si as u64)
                .wrapping_add(1_000 * p as u64);
            let cond = vec![subject.class_name.as_str(); k];
            let tgts = vec![tgt.as_str(); k];
            let prompts = vec![prompt.as_str(); k];
            let result = match &pixels {
                Some(px) => {
                    pipe.generate_batch(px.clone(), &cond, &tgts, &prompts, &g, None, &mut |_| {})?
                }
                None => pipe.generate_cached(&tgts, &prompts, &g, None, &mut |_| {})?,
            };
            let imgs = result.to_uint8()?;
            let mut written = 0;
            for (j, path) in paths.iter().enumerate() {
                if path.is_file() {
                    // The batch regenerates it identically (same seed); the file stays as it is.
                    continue;
                }
                let img = image::RgbImage::from_raw(
                    imgs.width as u32,
                    imgs.height as u32,
                    imgs.image(j).to_vec(),
                )
                .ok_or_else(|| AppError::Image("decoded image has an unexpected size".into()))?;
                // Written aside and renamed: an interrupted run never leaves a truncated PNG.
                let tmp = path.with_extension("png.partial");
                img.save_with_format(&tmp, image::ImageFormat::Png)
                    .map_err(|e| AppError::Image(format!("writing {}: {e}", tmp.display())))?;
                std::fs::rename(&tmp, path)
                    .map_err(|e| AppError::Image(format!("writing {}: {e}", path.display())))?;
                written += 1;
            }
            summary.written += written;
            summary.skipped += k - written;
            on_event(GenEvent::Prompt {
                subject: subject.name.clone(),
                prompt: shown,
                images: k,
                skipped: false,
            });
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::pipeline_prompt;

    #[test]
    fn templates_become_subject_and_prompt() {
        let t = |s: &str| pipeline_prompt(s, "backpack");
        assert_eq!(
            t("a {0} {1} in the jungle"),
            ("backpack".into(), "in the jungle".into())
        );
        assert_eq!(t("a red {0} {1}"), ("red backpack".into(), "".into()));
        assert_eq!(
            t("a cube shaped {0} {1}"),
            ("cube shaped backpack".into(), "".into())
        );
        assert_eq!(
            t("the {0} {1} on the beach"),
            ("backpack".into(), "the backpack on the beach".into())
        );
        assert_eq!(
            t("{0} {1} on the beach"),
            ("backpack".into(), "on the beach".into())
        );
    }
}
