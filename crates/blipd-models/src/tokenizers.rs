//! Tokenizers for BLIP-Diffusion, built on the HuggingFace `tokenizers` crate.
//!
//! * [`ClipTokenizer`]: the SD-1.5 CLIP BPE tokenizer (`tokenizer/vocab.json` + `merges.txt`, a
//!   `tokenizer.json`, or OpenAI's `bpe_simple_vocab_16e6.txt`). Ids match transformers'
//!   `CLIPTokenizer` (the slow tokenizer the diffusers pipeline loads) as it runs without `ftfy`
//!   installed: BERT-style text cleaning (control characters dropped, whitespace unified, spaces around
//!   CJK characters), NFC, lowercase, CLIP's regex split, byte-level BPE with `</w>`. `<|startoftext|>`
//!   = 49406 is prepended, `<|endoftext|>` = 49407 appended and used for padding. Truncation keeps the
//!   EOS last, exactly as `tokenizer(text, padding="max_length", truncation=True, max_length=n)`.
//! * [`BlipDiffusionPrompt`]: the released prompt construction (`"a {tgt_subject} {prompt}"` repeated
//!   `int(prompt_strength * prompt_reps)` times, joined by `", "`, tokenized to `77 - 16 = 61`), the
//!   unconditional prompt (77 tokens) and LAVIS' optional `blip_caption` text normaliser.
//! * [`BertTokenizer`]: bert-base-uncased WordPiece plus the `[DEC]` token (id 30522) for the Q-Former
//!   (`[CLS] dog [SEP]`, padded to the longest with an attention mask), as transformers'
//!   `BertTokenizer` + `add_special_tokens({"bos_token": "[DEC]"})`.
//!
//! No file is ever downloaded: the vocabularies are read from the paths given.

use std::path::{Path, PathBuf};

use ::tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use ::tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use ::tokenizers::models::bpe::{Vocab as BpeVocab, BPE};
use ::tokenizers::models::wordpiece::WordPiece;
use ::tokenizers::normalizers::{BertNormalizer, Lowercase, Sequence as NormalizerSequence, NFC};
use ::tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use ::tokenizers::pre_tokenizers::byte_level::ByteLevel;
use ::tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use ::tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use ::tokenizers::processors::bert::BertProcessing;
use ::tokenizers::processors::roberta::RobertaProcessing;
use ::tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};
use burn::prelude::*;

use crate::ModelError;

/// CLIP's `<|startoftext|>`.
pub const CLIP_BOS: &str = "<|startoftext|>";
/// CLIP's `<|endoftext|>` (also the SD padding token).
pub const CLIP_EOS: &str = "<|endoftext|>";
/// CLIP text context length.
pub const CLIP_MAX_LENGTH: usize = 77;
/// Number of OpenAI BPE merges CLIP uses (`merges[1 : 49152 - 256 - 2 + 1]`).
pub const CLIP_NUM_MERGES: usize = 49152 - 256 - 2;
/// The pre-tokenization regex of transformers' `CLIPTokenizer` (special-token alternatives dropped:
/// added tokens are split out before this runs).
pub const CLIP_SPLIT_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Environment variable naming a bert-base-uncased `vocab.txt`.
pub const BERT_VOCAB_ENV: &str = "BLIPD_BERT_VOCAB";
/// The Q-Former tokenizer's extra BOS token (LAVIS / diffusers add it after loading the vocab).
pub const BERT_DEC_TOKEN: &str = "[DEC]";

fn token_id(t: &Tokenizer, token: &str, source: &str) -> Result<u32, ModelError> {
    t.token_to_id(token).ok_or_else(|| {
        ModelError::Tokenizer(format!("{source}: the vocabulary has no `{token}` token"))
    })
}

fn tok_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("{what}: {e}"))
}

/// A batch of token ids with its attention mask (1 = token, 0 = padding), all rows the same length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
}

impl TokenBatch {
    pub fn batch_size(&self) -> usize {
        self.input_ids.len()
    }

    /// Row length (0 for an empty batch).
    pub fn seq_len(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }

    /// `[B, L]` Int tensor of the ids.
    pub fn ids_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        let (b, l) = (self.batch_size(), self.seq_len());
        let flat: Vec<i64> = self.input_ids.iter().flatten().map(|&i| i as i64).collect();
        Tensor::from_data(TensorData::new(flat, [b, l]), device)
    }

    /// `[B, L]` float tensor of the attention mask (1.0 keep, 0.0 pad).
    pub fn mask_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        let (b, l) = (self.batch_size(), self.seq_len());
        let flat: Vec<f32> = self
            .attention_mask
            .iter()
            .flatten()
            .map(|&m| m as f32)
            .collect();
        Tensor::from_data(TensorData::new(flat, [b, l]), device)
    }

    fn from_rows(rows: Vec<Vec<u32>>, pad_to: usize, pad_id: u32) -> Self {
        let mut input_ids = Vec::with_capacity(rows.len());
        let mut attention_mask = Vec::with_capacity(rows.len());
        for mut ids in rows {
            let n = ids.len();
            let mut mask = vec![1u32; n];
            if n < pad_to {
                ids.resize(pad_to, pad_id);
                mask.resize(pad_to, 0);
            }
            input_ids.push(ids);
            attention_mask.push(mask);
        }
        Self {
            input_ids,
            attention_mask,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CLIP
// ---------------------------------------------------------------------------------------------

/// The CLIP BPE tokenizer of SD-1.5 (and of BLIP-Diffusion's `tokenizer/` folder).
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// OpenAI's byte → printable-unicode table (`bytes_to_unicode`), in its canonical order: the 188
/// printable bytes keep their code point, the 68 others map to 256, 257, …
pub fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1u32..=0xAC);
    printable.extend(0xAEu32..=0xFF);
    let mut out: Vec<(u8, char)> = printable
        .iter()
        .map(|&b| (b as u8, char::from_u32(b).unwrap_or('?')))
        .collect();
    let mut n = 0u32;
    for b in 0u32..256 {
        if !printable.contains(&b) {
            out.push((b as u8, char::from_u32(256 + n).unwrap_or('?')));
            n += 1;
        }
    }
    out
}

/// A BPE merge rule (left symbol, right symbol).
pub type Merge = (String, String);

/// Build CLIP's vocabulary (token list, id = index) and merge list from the text of OpenAI's
/// `bpe_simple_vocab_16e6.txt` (header line first, as shipped).
pub fn clip_vocab_from_openai_bpe(text: &str) -> Result<(Vec<String>, Vec<Merge>), ModelError> {
    let lines: Vec<&str> = text.split('\n').collect();
    if lines.len() < CLIP_NUM_MERGES + 1 {
        return Err(ModelError::Tokenizer(format!(
            "OpenAI BPE file has {} lines, expected at least {} (header + {} merges)",
            lines.len(),
            CLIP_NUM_MERGES + 1,
            CLIP_NUM_MERGES
        )));
    }
    let mut merges = Vec::with_capacity(CLIP_NUM_MERGES);
    for (i, line) in lines[1..=CLIP_NUM_MERGES].iter().enumerate() {
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()))
            }
            _ => {
                return Err(ModelError::Tokenizer(format!(
                    "OpenAI BPE file line {}: expected two space-separated symbols, found {line:?}",
                    i + 2
                )))
            }
        }
    }
    let bytes: Vec<String> = bytes_to_unicode()
        .into_iter()
        .map(|(_, c)| c.to_string())
        .collect();
    let mut vocab: Vec<String> = bytes.clone();
    vocab.extend(bytes.iter().map(|b| format!("{b}</w>")));
    vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    vocab.push(CLIP_BOS.into());
    vocab.push(CLIP_EOS.into());
    Ok((vocab, merges))
}

/// Write an OpenAI BPE file as HF `vocab.json` + `merges.txt` (the layout of SD's `tokenizer/`).
pub fn write_clip_vocab_files(bpe_txt: &Path, out_dir: &Path) -> Result<(), ModelError> {
    let text = std::fs::read_to_string(bpe_txt).map_err(|source| ModelError::Io {
        path: bpe_txt.to_path_buf(),
        source,
    })?;
    let (vocab, merges) = clip_vocab_from_openai_bpe(&text)?;
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::Value::from(i as u64)))
        .collect();
    let json = serde_json::to_string(&map).map_err(|e| tok_err("serialising vocab.json", e))?;
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        merges_txt.push_str(a);
        merges_txt.push(' ');
        merges_txt.push_str(b);
        merges_txt.push('\n');
    }
    let io = |path: PathBuf, source| ModelError::Io { path, source };
    std::fs::create_dir_all(out_dir).map_err(|e| io(out_dir.to_path_buf(), e))?;
    let vp = out_dir.join("vocab.json");
    crate::weights::atomic_write(&vp, json.as_bytes()).map_err(|e| io(vp.clone(), e))?;
    let mp = out_dir.join("merges.txt");
    crate::weights::atomic_write(&mp, merges_txt.as_bytes()).map_err(|e| io(mp.clone(), e))?;
    Ok(())
}

/// The model files of a tokenizer (`vocab.json` + `merges.txt` for BPE, `vocab.txt` for WordPiece).
fn save_model_files(t: &Tokenizer, dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    use ::tokenizers::Model;
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    t.get_model()
        .save(dir, None)
        .map_err(|e| tok_err(format!("writing the tokenizer into {}", dir.display()), e))
}

impl ClipTokenizer {
    /// From HF `vocab.json` + `merges.txt`.
    pub fn from_vocab_merges(vocab_json: &Path, merges_txt: &Path) -> Result<Self, ModelError> {
        for p in [vocab_json, merges_txt] {
            if !p.is_file() {
                return Err(ModelError::Tokenizer(format!(
                    "CLIP tokenizer file {} does not exist",
                    p.display()
                )));
            }
        }
        let what = format!(
            "reading {} + {}",
            vocab_json.display(),
            merges_txt.display()
        );
        let (vocab, mut merges) =
            BPE::read_file(&vocab_json.to_string_lossy(), &merges_txt.to_string_lossy())
                .map_err(|e| tok_err(&what, e))?;
        // The slow CLIPTokenizer only reads the first 49152 - 256 - 2 merges of the file.
        merges.truncate(CLIP_NUM_MERGES);
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .end_of_word_suffix("</w>".into())
            .unk_token(CLIP_EOS.into())
            .build()
            .map_err(|e| tok_err(&what, e))?;
        Self::from_bpe(bpe, &vocab_json.display().to_string())
    }

    /// From an in-memory vocabulary (token list, id = index) and merge list.
    pub fn from_vocab_list(
        vocab: &[String],
        merges: Vec<(String, String)>,
    ) -> Result<Self, ModelError> {
        let map: BpeVocab = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(map, merges)
            .end_of_word_suffix("</w>".into())
            .unk_token(CLIP_EOS.into())
            .build()
            .map_err(|e| tok_err("building CLIP BPE", e))?;
        Self::from_bpe(bpe, "in-memory vocabulary")
    }

    /// From OpenAI's `bpe_simple_vocab_16e6.txt` (decompressed).
    pub fn from_openai_bpe(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (vocab, merges) = clip_vocab_from_openai_bpe(&text)?;
        Self::from_vocab_list(&vocab, merges)
    }

    /// From a HF `tokenizer.json`. Only its BPE model (vocabulary and merges) is used: normalisation,
    /// pre-tokenisation and special tokens are rebuilt so ids match the slow `CLIPTokenizer`.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, ModelError> {
        let t = Tokenizer::from_file(path)
            .map_err(|e| tok_err(format!("reading {}", path.display()), e))?;
        match t.get_model() {
            ModelWrapper::BPE(bpe) => {
                let mut bpe = bpe.clone();
                bpe.end_of_word_suffix = Some("</w>".into());
                bpe.unk_token = Some(CLIP_EOS.into());
                Self::from_bpe(bpe, &path.display().to_string())
            }
            _ => Err(ModelError::Tokenizer(format!(
                "{}: the model is not BPE, so it is not a CLIP tokenizer",
                path.display()
            ))),
        }
    }

    /// Write `vocab.json` + `merges.txt` into `dir` (created if needed), the files [`Self::from_dir`]
    /// reads back into the same tokenizer.
    pub fn save_dir(&self, dir: &Path) -> Result<(), ModelError> {
        save_model_files(&self.inner, dir).map(|_| ())
    }

    /// From a tokenizer folder: `vocab.json` + `merges.txt` (preferred, what the released
    /// `tokenizer/` folders hold) or `tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let (v, m, j) = (
            dir.join("vocab.json"),
            dir.join("merges.txt"),
            dir.join("tokenizer.json"),
        );
        if v.is_file() && m.is_file() {
            Self::from_vocab_merges(&v, &m)
        } else if j.is_file() {
            Self::from_tokenizer_json(&j)
        } else {
            Err(ModelError::Tokenizer(format!(
                "no CLIP tokenizer in {}: expected vocab.json + merges.txt or tokenizer.json",
                dir.display()
            )))
        }
    }

    fn from_bpe(bpe: BPE, source: &str) -> Result<Self, ModelError> {
        let mut inner = Tokenizer::new(bpe);
        // transformers `BasicTokenizer(strip_accents=False, do_split_on_punc=False)`: clean text and pad
        // CJK characters (no lowercase/accent strip here), then NFC, then lowercase.
        let normalizer = NormalizerSequence::new(vec![
            NormalizerWrapper::BertNormalizer(BertNormalizer::new(true, true, Some(false), false)),
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Lowercase(Lowercase),
        ]);
        inner
            .with_normalizer(Some(NormalizerWrapper::Sequence(normalizer)))
            .map_err(|e| tok_err(source, e))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT_REGEX.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| tok_err("CLIP split regex", e))?;
        inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(
            PreTokenizerSequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ]),
        )));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
        let (bos_id, eos_id) = (
            token_id(&inner, CLIP_BOS, source)?,
            token_id(&inner, CLIP_EOS, source)?,
        );
        inner.with_post_processor(Some(PostProcessorWrapper::Roberta(
            RobertaProcessing::new((CLIP_EOS.into(), eos_id), (CLIP_BOS.into(), bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        )));
        inner
            .add_special_tokens(vec![
                AddedToken::from(CLIP_BOS, true),
                AddedToken::from(CLIP_EOS, true),
            ])
            .map_err(|e| tok_err(source, e))?;
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            pad_id: eos_id,
        })
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Padding id (= EOS, as SD's `tokenizer/special_tokens_map.json`).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` object (normaliser, pre-tokenizer, BPE, post-processor).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// BPE ids of `text` without BOS/EOS, untruncated.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err(format!("tokenizing {text:?}"), e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// How many tokens of `text` [`Self::encode`] with `max_length` drops (0 when it fits with BOS
    /// and EOS).
    pub fn overflow(&self, text: &str, max_length: usize) -> Result<usize, ModelError> {
        Ok(self
            .tokenize(text)?
            .len()
            .saturating_sub(max_length.saturating_sub(2)))
    }

    /// `[BOS] ids [EOS]`, truncated to `max_length` (the EOS kept last) and right-padded with the pad
    /// id to exactly `max_length`: transformers' `padding="max_length", truncation=True`.
    pub fn encode(&self, text: &str, max_length: usize) -> Result<Vec<u32>, ModelError> {
        Ok(self.encode_with_mask(text, max_length)?.0)
    }

    fn encode_with_mask(
        &self,
        text: &str,
        max_length: usize,
    ) -> Result<(Vec<u32>, usize), ModelError> {
        if max_length < 2 {
            return Err(ModelError::Tokenizer(format!(
                "max_length {max_length} leaves no room for BOS and EOS"
            )));
        }
        let mut body = self.tokenize(text)?;
        body.truncate(max_length - 2);
        let mut ids = Vec::with_capacity(max_length);
        ids.push(self.bos_id);
        ids.extend(body);
        ids.push(self.eos_id);
        let n = ids.len();
        ids.resize(max_length, self.pad_id);
        Ok((ids, n))
    }

    /// Batch version of [`Self::encode`], with the attention mask (1 up to and including EOS).
    pub fn encode_batch(
        &self,
        texts: &[&str],
        max_length: usize,
    ) -> Result<TokenBatch, ModelError> {
        let mut input_ids = Vec::with_capacity(texts.len());
        let mut attention_mask = Vec::with_capacity(texts.len());
        for t in texts {
            let (ids, n) = self.encode_with_mask(t, max_length)?;
            let mut mask = vec![1u32; n];
            mask.resize(max_length, 0);
            input_ids.push(ids);
            attention_mask.push(mask);
        }
        Ok(TokenBatch {
            input_ids,
            attention_mask,
        })
    }

    /// Decode ids back to text (special tokens skipped when asked) as transformers' `CLIPTokenizer`
    /// joins tokens (`convert_tokens_to_string`): the byte-level text with each word end `</w>` as a
    /// space, stripped; `decode(&[id])` of `cat</w>` is `"cat"`. (transformers' optional clean-up of
    /// spaces before punctuation is not applied.)
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err("decoding", e))?;
        Ok(text.replace("</w>", " ").trim().to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// BLIP-Diffusion prompt construction
// ---------------------------------------------------------------------------------------------

/// Python's `str.isspace` (Rust's `char::is_whitespace` plus the four information separators).
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` (no argument).
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

/// LAVIS `BlipCaptionProcessor` (`blip_caption`, prompt `""`): lowercase, replace each of
/// `. ! " ( ) * # : ;  ~` by a space, collapse runs of two or more whitespace characters into one
/// space, strip trailing newlines and surrounding spaces, keep at most `max_words` space-separated words.
/// LAVIS' notebooks pass the subjects and the prompt through it (`max_words = 50`).
pub fn blip_caption(text: &str, max_words: usize) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|c| if ".!\"()*#:;~".contains(c) { ' ' } else { c })
        .collect();
    // re.sub(r"\s{2,}", " ", ·): only runs of two or more are rewritten.
    let chars: Vec<char> = lowered.chars().collect();
    let mut collapsed = String::with_capacity(lowered.len());
    let mut i = 0;
    while i < chars.len() {
        if py_isspace(chars[i]) {
            let mut j = i;
            while j < chars.len() && py_isspace(chars[j]) {
                j += 1;
            }
            if j - i >= 2 {
                collapsed.push(' ');
            } else {
                collapsed.push(chars[i]);
            }
            i = j;
        } else {
            collapsed.push(chars[i]);
            i += 1;
        }
    }
    let s = collapsed.trim_end_matches('\n').trim_matches(' ');
    let words: Vec<&str> = s.split(' ').collect();
    if words.len() > max_words {
        words[..max_words].join(" ")
    } else {
        s.to_string()
    }
}

/// Optional text normalisation applied to subjects and prompts before prompt building.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TextNormalization {
    /// diffusers: the prompt is only `.strip()`ped.
    #[default]
    None,
    /// LAVIS notebooks: [`blip_caption`] with this many words.
    BlipCaption { max_words: usize },
}

impl TextNormalization {
    /// LAVIS' default `blip_caption` (50 words).
    pub fn lavis() -> Self {
        Self::BlipCaption { max_words: 50 }
    }

    pub fn apply(&self, text: &str) -> String {
        match *self {
            Self::None => text.to_string(),
            Self::BlipCaption { max_words } => blip_caption(text, max_words),
        }
    }
}

pub use crate::conditioning::{BlipDiffusionPrompt, PromptTemplate};

// ---------------------------------------------------------------------------------------------
// BERT (Q-Former)
// ---------------------------------------------------------------------------------------------

/// Find the bert-base-uncased `vocab.txt` for the Q-Former tokenizer, in this order:
/// `<weights_dir>/qformer/vocab.txt`, then `explicit` (the CLI's `--bert-vocab FILE`), then the file
/// named by `$BLIPD_BERT_VOCAB`. Errors name all three options.
pub fn resolve_bert_vocab(
    weights_dir: Option<&Path>,
    explicit: Option<&Path>,
) -> Result<PathBuf, ModelError> {
    resolve_bert_vocab_with_env(
        weights_dir,
        explicit,
        std::env::var_os(BERT_VOCAB_ENV).map(PathBuf::from),
    )
}

/// [`resolve_bert_vocab`] with the environment value passed in (testable without touching the
/// process environment).
pub fn resolve_bert_vocab_with_env(
    weights_dir: Option<&Path>,
    explicit: Option<&Path>,
    env: Option<PathBuf>,
) -> Result<PathBuf, ModelError> {
    if let Some(dir) = weights_dir {
        let p = dir.join("qformer").join("vocab.txt");
        if p.is_file() {
            if let Some(e) = explicit {
                if e != p {
                    tracing::info!(
                        "using {} (found with the weights) rather than {}",
                        p.display(),
                        e.display()
                    );
                }
            }
            return Ok(p);
        }
    }
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(ModelError::Tokenizer(format!(
                "--bert-vocab {}: no such file",
                p.display()
            )))
        };
    }
    if let Some(p) = env.filter(|p| !p.as_os_str().is_empty()) {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(ModelError::Tokenizer(format!(
                "{BERT_VOCAB_ENV}={}: no such file",
                p.display()
            )))
        };
    }
    let in_weights = match weights_dir {
        Some(d) => d.join("qformer").join("vocab.txt").display().to_string(),
        None => "<weights dir>/qformer/vocab.txt".to_string(),
    };
    Err(ModelError::Tokenizer(format!(
        "no BERT vocabulary (bert-base-uncased vocab.txt, 30522 lines) for the Q-Former tokenizer; \
         provide it in one of three ways: put it at {in_weights}, pass --bert-vocab FILE, \
         or set {BERT_VOCAB_ENV}=FILE"
    )))
}

/// bert-base-uncased WordPiece tokenizer with `[DEC]` added, as the Q-Former uses it.
#[derive(Clone)]
pub struct BertTokenizer {
    inner: Tokenizer,
    cls_id: u32,
    sep_id: u32,
    pad_id: u32,
    dec_id: u32,
}

impl std::fmt::Debug for BertTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("cls_id", &self.cls_id)
            .field("sep_id", &self.sep_id)
            .field("pad_id", &self.pad_id)
            .field("dec_id", &self.dec_id)
            .finish()
    }
}

impl BertTokenizer {
    /// Resolve the vocabulary with [`resolve_bert_vocab`] and load it.
    pub fn resolve(
        weights_dir: Option<&Path>,
        explicit: Option<&Path>,
    ) -> Result<Self, ModelError> {
        Self::from_vocab(&resolve_bert_vocab(weights_dir, explicit)?)
    }

    /// From a `vocab.txt` (one token per line, id = line number). `[DEC]` gets the next id (30522
    /// for bert-base-uncased).
    pub fn from_vocab(vocab_txt: &Path) -> Result<Self, ModelError> {
        if !vocab_txt.is_file() {
            return Err(ModelError::Tokenizer(format!(
                "BERT vocabulary {} does not exist",
                vocab_txt.display()
            )));
        }
        let wp = WordPiece::from_file(&vocab_txt.to_string_lossy())
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| tok_err(format!("reading {}", vocab_txt.display()), e))?;
        Self::from_wordpiece(wp, &vocab_txt.display().to_string())
    }

    /// Write the WordPiece vocabulary as `dir/vocab.txt` (one token per line, id = line; without
    /// `[DEC]`, which [`Self::from_vocab`] appends again) and return its path.
    pub fn save_vocab(&self, dir: &Path) -> Result<PathBuf, ModelError> {
        let files = save_model_files(&self.inner, dir)?;
        files.into_iter().next().ok_or_else(|| {
            ModelError::Tokenizer(format!("no vocabulary file written in {}", dir.display()))
        })
    }

    /// From an in-memory vocabulary (id = index).
    pub fn from_vocab_list(vocab: &[String]) -> Result<Self, ModelError> {
        // Same map type as WordPiece's private `Vocab` alias.
        let map: BpeVocab = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let wp = WordPiece::builder()
            .vocab(map)
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| tok_err("building WordPiece", e))?;
        Self::from_wordpiece(wp, "in-memory vocabulary")
    }

    fn from_wordpiece(wp: WordPiece, source: &str) -> Result<Self, ModelError> {
        let mut inner = Tokenizer::new(wp);
        inner
            .with_normalizer(Some(NormalizerWrapper::BertNormalizer(
                BertNormalizer::new(true, true, None, true),
            )))
            .map_err(|e| tok_err(source, e))?;
        inner.with_pre_tokenizer(Some(PreTokenizerWrapper::BertPreTokenizer(
            BertPreTokenizer,
        )));
        inner.with_decoder(Some(DecoderWrapper::WordPiece(WordPieceDecoder::default())));
        let cls_id = token_id(&inner, "[CLS]", source)?;
        let sep_id = token_id(&inner, "[SEP]", source)?;
        let pad_id = token_id(&inner, "[PAD]", source)?;
        token_id(&inner, "[UNK]", source)?;
        inner.with_post_processor(Some(PostProcessorWrapper::Bert(BertProcessing::new(
            ("[SEP]".into(), sep_id),
            ("[CLS]".into(), cls_id),
        ))));
        let specials: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .iter()
            .filter(|t| inner.token_to_id(t).is_some())
            .map(|t| AddedToken::from(*t, true))
            .chain(std::iter::once(AddedToken::from(BERT_DEC_TOKEN, true)))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| tok_err(source, e))?;
        let dec_id = token_id(&inner, BERT_DEC_TOKEN, source)?;
        Ok(Self {
            inner,
            cls_id,
            sep_id,
            pad_id,
            dec_id,
        })
    }

    pub fn cls_id(&self) -> u32 {
        self.cls_id
    }

    pub fn sep_id(&self) -> u32 {
        self.sep_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// `[DEC]`, the Q-Former's BOS token (30522 with bert-base-uncased).
    pub fn dec_id(&self) -> u32 {
        self.dec_id
    }

    /// Vocabulary size including `[DEC]` (30523 with bert-base-uncased).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// `[CLS] wordpieces [SEP]`, untruncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| tok_err(format!("tokenizing {text:?}"), e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// transformers `tokenizer(texts, padding=True)`: each row `[CLS] … [SEP]`, right-padded with
    /// `[PAD]` to the longest row, attention mask 1/0. No truncation (as the Q-Former calls it).
    pub fn encode_batch(&self, texts: &[&str]) -> Result<TokenBatch, ModelError> {
        let rows = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<Vec<_>, _>>()?;
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        Ok(TokenBatch::from_rows(rows, longest, self.pad_id))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err("decoding", e))
    }
}
