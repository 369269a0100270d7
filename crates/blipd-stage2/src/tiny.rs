//! Self-contained tokenizers for the tiny model (no vocabulary files needed): a CLIP-style BPE whose
//! merges spell out each word of a small word list, and a BERT WordPiece over the same words.

use blipd_models::tokenizers::{BertTokenizer, ClipTokenizer};
use blipd_models::ModelError;

/// A CLIP BPE tokenizer over `words` (plus single characters, so any text of those characters
/// tokenizes) and a BERT WordPiece tokenizer over the same words (unknown words → `[UNK]`).
pub fn tiny_tokenizers(words: &[&str]) -> Result<(ClipTokenizer, BertTokenizer), ModelError> {
    let mut chars: Vec<char> = words.iter().flat_map(|w| w.chars()).collect();
    chars.extend('a'..='z');
    chars.extend([',', '.', '!', '?', '\'']);
    chars.sort_unstable();
    chars.dedup();
    let mut vocab: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut push = |t: String, vocab: &mut Vec<String>| {
        if seen.insert(t.clone()) {
            vocab.push(t);
        }
    };
    for c in &chars {
        push(c.to_string(), &mut vocab);
        push(format!("{c}</w>"), &mut vocab);
    }
    let mut merges: Vec<(String, String)> = Vec::new();
    let mut merge_seen = std::collections::HashSet::new();
    for w in words {
        let cs: Vec<char> = w.chars().collect();
        if cs.len() < 2 {
            continue;
        }
        let mut left = cs[0].to_string();
        for (i, c) in cs.iter().enumerate().skip(1) {
            let right = if i + 1 == cs.len() {
                format!("{c}</w>")
            } else {
                c.to_string()
            };
            let merged = format!("{left}{right}");
            if merge_seen.insert((left.clone(), right.clone())) {
                merges.push((left.clone(), right.clone()));
            }
            push(merged.clone(), &mut vocab);
            left = merged;
        }
    }
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    let clip = ClipTokenizer::from_vocab_list(&vocab, merges)?;

    let mut bert_vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for w in words {
        let w = w.to_lowercase();
        if !bert_vocab.contains(&w) {
            bert_vocab.push(w);
        }
    }
    let bert = BertTokenizer::from_vocab_list(&bert_vocab)?;
    Ok((clip, bert))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_single_tokens_where_merges_allow() {
        let words = ["a", "photo", "of", "red", "circle", "on", "background", ","];
        let (clip, bert) = tiny_tokenizers(&words).unwrap();
        let ids = clip.tokenize("a photo of a red circle").unwrap();
        let back = clip.decode(&ids, true).unwrap();
        assert_eq!(back.trim(), "a photo of a red circle");
        assert_eq!(ids.len(), 6, "one token per word: {ids:?}");
        let enc = clip.encode("a red circle", 10).unwrap();
        assert_eq!(enc.len(), 10);
        assert_eq!(enc[0], clip.bos_id());
        let b = bert.encode("red circle").unwrap();
        assert_eq!(b.len(), 4);
        assert_eq!(b[0], bert.cls_id());
        assert_eq!(bert.encode("zebra").unwrap()[1], 1, "unknown word is [UNK]");
    }
}
