//! A self-contained BERT WordPiece tokenizer for the tiny preset: the special tokens plus every word of
//! the synthetic captions (`blipd_data::synthetic::vocabulary`); other words become `[UNK]`. `[DEC]` is
//! added last, as in BLIP-2.

use blipd_models::tokenizers::BertTokenizer;
use blipd_models::ModelError;

/// `[PAD] [UNK] [CLS] [SEP] [MASK]` + the lower-cased `words` (deduplicated, in order).
pub fn tiny_bert_tokenizer(words: &[&str]) -> Result<BertTokenizer, ModelError> {
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for w in words {
        let w = w.to_lowercase();
        if !vocab.contains(&w) {
            vocab.push(w);
        }
    }
    BertTokenizer::from_vocab_list(&vocab)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_captions_are_known_words() {
        let words = blipd_data::synthetic::vocabulary();
        let tok = tiny_bert_tokenizer(&words).unwrap();
        let p = blipd_data::synthetic::synth_pair(0, 0, 16);
        let ids = tok.encode(&p.caption).unwrap();
        assert_eq!(ids[0], tok.cls_id());
        assert_eq!(*ids.last().unwrap(), tok.sep_id());
        assert!(!ids.contains(&1), "no [UNK] in {:?}: {ids:?}", p.caption);
        assert_eq!(tok.dec_id() as usize, tok.vocab_size() - 1);
    }
}
