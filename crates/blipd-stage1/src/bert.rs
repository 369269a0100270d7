//! Initialise the Q-Former from a BERT checkpoint, as LAVIS `Blip2Base.init_Qformer` does:
//! `BertLMHeadModel.from_pretrained("bert-base-uncased")` (cross-attention layers and queries stay
//! freshly initialised), `resize_token_embeddings(len(tokenizer))` (the `[DEC]` row drawn from
//! N(0, initializer_range), the LM bias extended with zeros), then every `*_query` FFN weight copied
//! from its text twin.
//!
//! Accepted keys: `BertModel`, `BertForPreTraining`/`BertForMaskedLM`/`BertLMHeadModel` layouts (with or
//! without the `bert.` prefix, `LayerNorm.weight/bias` or the old `gamma/beta`). Dropped: token-type
//! embeddings (the Q-Former has none), pooler, next-sentence head, the tied decoder weight/bias and
//! the `position_ids` buffer. Anything else is an error naming the key.

use std::collections::BTreeMap;

use blipd_models::qformer::{heads_reverse_key_map, reverse_key_map};
use blipd_models::weights::{collect_reference, StateDict, WeightsError};
use burn::prelude::*;
use burn::tensor::Distribution;

use crate::model::Stage1Model;
use crate::Stage1Error;

fn read_err(sd: &StateDict, message: String) -> Stage1Error {
    Stage1Error::Weights(WeightsError::Read {
        path: sd.source.clone(),
        message,
    })
}

fn f32s(sd: &StateDict, d: &TensorData, key: &str) -> Result<Vec<f32>, Stage1Error> {
    d.clone()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| read_err(sd, format!("`{key}`: {e:?}")))
}

/// Where one BERT key goes (after prefix/norm renaming): our diffusers-layout Q-Former keys and/or the
/// heads' `Blip2Qformer`-relative keys. `None` = dropped.
fn targets(k: &str) -> Option<Vec<String>> {
    let dropped = k.starts_with("pooler.")
        || k.starts_with("cls.seq_relationship.")
        || k.starts_with("cls.predictions.decoder.")
        || k == "embeddings.token_type_embeddings.weight"
        || k.ends_with("position_ids");
    if dropped {
        return None;
    }
    if let Some(rest) = k.strip_prefix("cls.predictions.") {
        return Some(vec![format!("Qformer.cls.predictions.{rest}")]);
    }
    if let Some(rest) = k.strip_prefix("encoder.layer.") {
        let (i, tail) = rest.split_once('.')?;
        if let Some(x) = tail.strip_prefix("attention.self.") {
            return Some(vec![format!("encoder.layer.{i}.attention.attention.{x}")]);
        }
        if tail.starts_with("intermediate.") || tail.starts_with("output.") {
            let (module, x) = tail.split_once('.')?;
            return Some(vec![
                format!("encoder.layer.{i}.{module}.{x}"),
                format!("encoder.layer.{i}.{module}_query.{x}"),
            ]);
        }
    }
    Some(vec![k.to_string()])
}

/// See the module docs.
pub fn apply<B: Backend>(
    model: Stage1Model<B>,
    bert: StateDict,
) -> Result<Stage1Model<B>, Stage1Error> {
    let device = model.qformer.query_tokens.device();
    let own_q: BTreeMap<String, TensorData> =
        collect_reference(&model.qformer, &reverse_key_map())?
            .into_iter()
            .collect();
    let own_h: BTreeMap<String, TensorData> =
        collect_reference(&model.heads, &heads_reverse_key_map())?
            .into_iter()
            .collect();
    let std = 0.02;
    let (mut q, mut h) = (own_q.clone(), own_h.clone());
    let mut problems = Vec::new();
    let mut loaded = 0usize;
    for key in bert.keys() {
        let k = key.strip_prefix("bert.").unwrap_or(key);
        let k = k
            .replace("LayerNorm.gamma", "LayerNorm.weight")
            .replace("LayerNorm.beta", "LayerNorm.bias");
        let Some(dests) = targets(&k) else { continue };
        let data = bert.data(key)?;
        let shape = data.shape.as_slice().to_vec();
        for dest in dests {
            let (own, out) = if dest.starts_with("Qformer.cls.") {
                (&own_h, &mut h)
            } else {
                (&own_q, &mut q)
            };
            let Some(mine) = own.get(&dest) else {
                problems.push(format!("`{key}`: no Q-Former parameter `{dest}`"));
                continue;
            };
            let want = mine.shape.as_slice().to_vec();
            let value = if shape == want {
                data.clone()
            } else if dest == "embeddings.word_embeddings.weight"
                && shape.len() == 2
                && shape[1] == want[1]
                && shape[0] <= want[0]
            {
                // resize_token_embeddings: new rows ([DEC]) ~ N(0, initializer_range).
                let mut v = f32s(&bert, &data, key)?;
                let extra = Tensor::<B, 2>::random(
                    [want[0] - shape[0], want[1]],
                    Distribution::Normal(0.0, std),
                    &device,
                );
                v.extend(f32s(&bert, &extra.into_data(), key)?);
                TensorData::new(v, want.clone())
            } else if dest == "Qformer.cls.predictions.bias"
                && shape.len() == 1
                && shape[0] <= want[0]
            {
                let mut v = f32s(&bert, &data, key)?;
                v.resize(want[0], 0.0);
                TensorData::new(v, want.clone())
            } else if dest == "embeddings.position_embeddings.weight"
                && shape.len() == 2
                && shape[1] == want[1]
                && shape[0] >= want[0]
            {
                let v = f32s(&bert, &data, key)?;
                TensorData::new(v[..want[0] * want[1]].to_vec(), want.clone())
            } else {
                problems.push(format!(
                    "`{key}` → `{dest}`: shape {shape:?}, expected {want:?}"
                ));
                continue;
            };
            out.insert(dest, value);
            loaded += 1;
        }
    }
    if !problems.is_empty() {
        return Err(read_err(
            &bert,
            format!("BERT initialisation:\n  {}", problems.join("\n  ")),
        ));
    }
    if loaded == 0 {
        return Err(read_err(&bert, "no BERT weights found".into()));
    }
    tracing::info!(
        "initialised {loaded} Q-Former/LM-head tensors from {}",
        bert.source.display()
    );
    let qsd = StateDict::from_tensors(bert.source.clone(), q.into_iter().collect());
    let hsd = StateDict::from_tensors(bert.source.clone(), h.into_iter().collect());
    Ok(Stage1Model {
        qformer: model.qformer.load_state_dict(qsd)?,
        heads: model.heads.load_state_dict(hsd)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Stage1Components;
    use crate::Stage1Config;

    type NB = burn::backend::NdArray<f32>;

    fn get(m: &BTreeMap<String, TensorData>, k: &str) -> Vec<f32> {
        m[k].clone().convert::<f32>().to_vec::<f32>().unwrap()
    }

    #[test]
    fn bert_checkpoint_fills_body_and_lm_head() {
        let dev = Default::default();
        let cfg = Stage1Config::default();
        let donor = Stage1Components::<NB>::from_config(&cfg, &dev)
            .unwrap()
            .model;
        let target = Stage1Components::<NB>::from_config(&cfg, &dev)
            .unwrap()
            .model;
        // A `BertForPreTraining`-style checkpoint made from the donor's text side (old gamma/beta names,
        // one vocabulary row fewer: no [DEC]).
        let own: BTreeMap<String, TensorData> =
            collect_reference(&donor.qformer, &reverse_key_map())
                .unwrap()
                .into_iter()
                .collect();
        let heads: BTreeMap<String, TensorData> =
            collect_reference(&donor.heads, &heads_reverse_key_map())
                .unwrap()
                .into_iter()
                .collect();
        let mut bert = Vec::new();
        for (k, v) in &own {
            let keep = k.starts_with("embeddings.")
                || (k.starts_with("encoder.")
                    && !k.contains("crossattention")
                    && !k.contains("_query."));
            if !keep {
                continue;
            }
            let k2 = k
                .replace(".attention.attention.", ".attention.self.")
                .replace("LayerNorm.weight", "LayerNorm.gamma");
            let v = if k == "embeddings.word_embeddings.weight" {
                let s = v.shape.as_slice().to_vec();
                let all = v.clone().convert::<f32>().to_vec::<f32>().unwrap();
                TensorData::new(all[..(s[0] - 1) * s[1]].to_vec(), [s[0] - 1, s[1]])
            } else {
                v.clone()
            };
            bert.push((format!("bert.{k2}"), v));
        }
        for (k, v) in &heads {
            if let Some(rest) = k.strip_prefix("Qformer.") {
                bert.push((rest.to_string(), v.clone()));
            }
        }
        bert.push((
            "bert.embeddings.token_type_embeddings.weight".into(),
            TensorData::new(vec![0f32; 64], [2, 32]),
        ));
        bert.push((
            "bert.pooler.dense.bias".into(),
            TensorData::new(vec![0f32; 32], [32]),
        ));
        let sd = StateDict::from_tensors("bert.safetensors", bert);
        let before: BTreeMap<String, TensorData> =
            collect_reference(&target.qformer, &reverse_key_map())
                .unwrap()
                .into_iter()
                .collect();
        let m = apply(target, sd).unwrap();
        let after: BTreeMap<String, TensorData> = collect_reference(&m.qformer, &reverse_key_map())
            .unwrap()
            .into_iter()
            .collect();
        let k = "encoder.layer.1.intermediate.dense.weight";
        assert_eq!(get(&after, k), get(&own, k));
        // `*_query` FFNs copied from the text FFNs.
        assert_eq!(
            get(&after, "encoder.layer.1.intermediate_query.dense.weight"),
            get(&own, k)
        );
        assert_eq!(
            get(&after, "encoder.layer.0.output_query.LayerNorm.weight"),
            get(&own, "encoder.layer.0.output.LayerNorm.weight")
        );
        // Cross-attention and queries keep their fresh values.
        for k in [
            "encoder.layer.0.crossattention.attention.key.weight",
            "query_tokens",
        ] {
            assert_eq!(get(&after, k), get(&before, k), "{k}");
        }
        // Word embeddings: BERT rows + a new [DEC] row.
        let w = get(&after, "embeddings.word_embeddings.weight");
        let d = get(&own, "embeddings.word_embeddings.weight");
        assert_eq!(w[..w.len() - 32], d[..d.len() - 32]);
        let mh: BTreeMap<String, TensorData> =
            collect_reference(&m.heads, &heads_reverse_key_map())
                .unwrap()
                .into_iter()
                .collect();
        let b = get(&mh, "Qformer.cls.predictions.bias");
        assert_eq!(b.last(), Some(&0.0), "LM bias extended with 0");
        // An unknown key is named.
        let bad = StateDict::from_tensors(
            "x",
            vec![(
                "bert.encoder.layer.9.attention.self.query.weight".into(),
                TensorData::new(vec![0f32; 4], [2, 2]),
            )],
        );
        let err = apply(m, bad).err().unwrap().to_string();
        assert!(err.contains("encoder.layer.9"), "{err}");
    }
}
