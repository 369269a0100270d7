//! LAVIS checkpoint layout for the BLIP-Diffusion image side (ViT + `ln_vision` + Q-Former + ProjLayer)
//! and BLIP-2's stage-1 heads.
//!
//! LAVIS `BlipDiffusion` module keys (model.md §2.2) put the BLIP-2 model under `blip.`:
//! `blip.visual_encoder.{class_embedding [D], positional_embedding [N+1, D], conv1, ln_pre,
//! transformer.resblocks.i.{ln_1, attn.in_proj_weight/bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}}`,
//! `blip.ln_vision`, `blip.query_tokens`, `blip.Qformer.bert.*` (`.self.` where diffusers has
//! `.attention.`), `blip.Qformer.cls.*`, `blip.{vision_proj, text_proj, itm_head, temp}` and, outside
//! `blip.`, `proj_layer.*`. The tarball's `blip_model/blip_weight.pt` holds the same keys without the
//! `blip.` prefix (pass `prefix = ""`).
//!
//! [`to_diffusers_qformer`] converts to the diffusers `qformer/` layout (what
//! `convert_blipdiffusion_to_diffusers.py` does, model.md §2.3), including the shape fixes
//! (`class_embedding [D] → [1, 1, D]`, `positional_embedding [N+1, D] → [1, N+1, D]`); the result loads
//! with [`crate::qformer::Blip2QFormerModel::load_state_dict`]. [`heads_state_dict`] extracts the
//! stage-1 heads for [`crate::qformer::QFormerHeads::load_state_dict`]. [`from_diffusers_qformer`] goes
//! back (for writing LAVIS-layout checkpoints).
//!
//! Note that LAVIS runs the ViT with LayerNorm eps 1e-5 (`Blip2VisionConfig::blipdiffusion_lavis`),
//! diffusers with 1e-6.

use std::collections::BTreeMap;

use burn::tensor::{Shape, TensorData};

use super::{KeyMap, StateDict, WeightsError};

/// Prefix of the BLIP-2 sub-model in LAVIS `BlipDiffusion` checkpoints.
pub const BLIP_PREFIX: &str = "blip.";

fn escape(prefix: &str) -> String {
    regex::escape(prefix)
}

/// LAVIS → diffusers `qformer/` names, for keys already selected by [`is_qformer_key`].
pub fn qformer_key_map(prefix: &str) -> KeyMap {
    let p = escape(prefix);
    let rules: Vec<(String, String)> = vec![
        (
            format!(r"^{p}visual_encoder\.class_embedding$"),
            "visual_encoder.embeddings.class_embedding".into(),
        ),
        (
            format!(r"^{p}visual_encoder\.positional_embedding$"),
            "visual_encoder.embeddings.position_embedding".into(),
        ),
        (
            format!(r"^{p}visual_encoder\.conv1\."),
            "visual_encoder.embeddings.patch_embedding.".into(),
        ),
        (
            format!(r"^{p}visual_encoder\.ln_pre\."),
            "visual_encoder.pre_layernorm.".into(),
        ),
        (
            format!(r"^{p}visual_encoder\.transformer\.resblocks\.(\d+)\."),
            "visual_encoder.encoder.layers.$1.".into(),
        ),
        (r"\.ln_1\.".into(), ".layer_norm1.".into()),
        (r"\.ln_2\.".into(), ".layer_norm2.".into()),
        (
            r"\.attn\.in_proj_weight$".into(),
            ".self_attn.qkv.weight".into(),
        ),
        (
            r"\.attn\.in_proj_bias$".into(),
            ".self_attn.qkv.bias".into(),
        ),
        (
            r"\.attn\.out_proj\.".into(),
            ".self_attn.projection.".into(),
        ),
        (r"\.mlp\.c_fc\.".into(), ".mlp.fc1.".into()),
        (r"\.mlp\.c_proj\.".into(), ".mlp.fc2.".into()),
        (
            format!(r"^{p}ln_vision\."),
            "visual_encoder.post_layernorm.".into(),
        ),
        (format!(r"^{p}query_tokens$"), "query_tokens".into()),
        (format!(r"^{p}Qformer\.bert\."), "".into()),
        (
            r"^encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.".into(),
            "encoder.layer.$1.$2.attention.".into(),
        ),
    ];
    KeyMap {
        rules: rules.into_iter().collect(),
    }
}

/// diffusers `qformer/` → LAVIS names (inverse of [`qformer_key_map`]).
pub fn qformer_reverse_key_map(prefix: &str) -> KeyMap {
    let rules: Vec<(String, String)> = vec![
        (
            r"^encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.".into(),
            "encoder.layer.$1.$2.self.".into(),
        ),
        (
            r"^(embeddings|encoder)\.".into(),
            format!("{prefix}Qformer.bert.$1."),
        ),
        (r"^query_tokens$".into(), format!("{prefix}query_tokens")),
        (
            r"^visual_encoder\.post_layernorm\.".into(),
            format!("{prefix}ln_vision."),
        ),
        (
            r"^visual_encoder\.embeddings\.class_embedding$".into(),
            format!("{prefix}visual_encoder.class_embedding"),
        ),
        (
            r"^visual_encoder\.embeddings\.position_embedding$".into(),
            format!("{prefix}visual_encoder.positional_embedding"),
        ),
        (
            r"^visual_encoder\.embeddings\.patch_embedding\.".into(),
            format!("{prefix}visual_encoder.conv1."),
        ),
        (
            r"^visual_encoder\.pre_layernorm\.".into(),
            format!("{prefix}visual_encoder.ln_pre."),
        ),
        (
            r"^visual_encoder\.encoder\.layers\.(\d+)\.".into(),
            format!("{prefix}visual_encoder.transformer.resblocks.$1."),
        ),
        (r"\.layer_norm1\.".into(), ".ln_1.".into()),
        (r"\.layer_norm2\.".into(), ".ln_2.".into()),
        (
            r"\.self_attn\.qkv\.weight$".into(),
            ".attn.in_proj_weight".into(),
        ),
        (
            r"\.self_attn\.qkv\.bias$".into(),
            ".attn.in_proj_bias".into(),
        ),
        (
            r"\.self_attn\.projection\.".into(),
            ".attn.out_proj.".into(),
        ),
        (r"\.mlp\.fc1\.".into(), ".mlp.c_fc.".into()),
        (r"\.mlp\.fc2\.".into(), ".mlp.c_proj.".into()),
    ];
    KeyMap { rules }
}

/// Whether a LAVIS key belongs to the diffusers `qformer/` component (ViT, `ln_vision`, queries, BERT,
/// ProjLayer). The BERT `position_ids` buffer is excluded.
pub fn is_qformer_key(key: &str, prefix: &str) -> bool {
    if key.starts_with("proj_layer.") {
        return true;
    }
    let Some(rest) = key.strip_prefix(prefix) else {
        return false;
    };
    (rest.starts_with("visual_encoder.")
        || rest.starts_with("ln_vision.")
        || rest == "query_tokens"
        || rest.starts_with("Qformer.bert."))
        && !rest.ends_with("embeddings.position_ids")
}

/// Whether a LAVIS key belongs to the stage-1 heads.
pub fn is_heads_key(key: &str, prefix: &str) -> bool {
    let Some(rest) = key.strip_prefix(prefix) else {
        return false;
    };
    rest.starts_with("vision_proj.")
        || rest.starts_with("text_proj.")
        || rest.starts_with("itm_head.")
        || rest == "temp"
        || rest.starts_with("Qformer.cls.")
}

fn subset(sd: &StateDict, keep: impl Fn(&str) -> bool) -> StateDict {
    StateDict {
        source: sd.source.clone(),
        tensors: sd
            .tensors
            .iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn reshape(sd: &mut StateDict, key: &str, shape: Vec<usize>) -> Result<(), WeightsError> {
    let mut data: TensorData = sd.take(key)?;
    let have: usize = data.shape.num_elements();
    let want: usize = shape.iter().product();
    if have != want {
        return Err(WeightsError::Read {
            path: sd.source.clone(),
            message: format!(
                "`{key}`: cannot reshape {:?} to {shape:?}",
                data.shape.as_slice()
            ),
        });
    }
    data.shape = Shape::from(shape);
    sd.insert(key, data);
    Ok(())
}

/// Convert the image-side keys of a LAVIS checkpoint (`prefix` = [`BLIP_PREFIX`] for a `BlipDiffusion`
/// state dict, `""` for `blip_weight.pt` + `proj_weight.pt` merged) into the diffusers `qformer/`
/// layout. Other keys (heads, text encoder, U-Net, …) are ignored. Errors if nothing matched.
pub fn to_diffusers_qformer(sd: &StateDict, prefix: &str) -> Result<StateDict, WeightsError> {
    let sel = subset(sd, |k| is_qformer_key(k, prefix));
    if sel.is_empty() {
        return Err(WeightsError::Read {
            path: sd.source.clone(),
            message: format!("no LAVIS Q-Former keys under prefix `{prefix}`"),
        });
    }
    let mut out = sel.remap(&qformer_key_map(prefix))?;
    let cls = "visual_encoder.embeddings.class_embedding";
    if let Some(s) = out.tensors.get(cls) {
        let d = s.shape.num_elements();
        reshape(&mut out, cls, vec![1, 1, d])?;
    }
    let pos = "visual_encoder.embeddings.position_embedding";
    if let Some(s) = out.tensors.get(pos) {
        let dims = s.shape.as_slice().to_vec();
        if dims.len() == 2 {
            reshape(&mut out, pos, vec![1, dims[0], dims[1]])?;
        }
    }
    Ok(out)
}

/// The inverse of [`to_diffusers_qformer`]: a diffusers `qformer/` state dict in LAVIS names (under
/// `prefix`), with LAVIS's shapes (`class_embedding [D]`, `positional_embedding [N+1, D]`).
pub fn from_diffusers_qformer(sd: &StateDict, prefix: &str) -> Result<StateDict, WeightsError> {
    let mut sd = subset(sd, |k| !k.ends_with("embeddings.position_ids"));
    for (key, keep_last) in [
        ("visual_encoder.embeddings.class_embedding", 1usize),
        ("visual_encoder.embeddings.position_embedding", 2),
    ] {
        if let Some(s) = sd.tensors.get(key) {
            let dims = s.shape.as_slice().to_vec();
            if dims.len() > keep_last {
                let tail = dims[dims.len() - keep_last..].to_vec();
                reshape(&mut sd, key, tail)?;
            }
        }
    }
    sd.remap(&qformer_reverse_key_map(prefix))
}

/// Whether `a` and `b` are the same tensor: shape and every value bit for bit (so a NaN in one of them
/// is a difference, as a max-abs fold from 0 would not report it).
fn identical(a: &TensorData, b: &TensorData) -> bool {
    if a.shape != b.shape {
        return false;
    }
    let values = |t: &TensorData| t.clone().convert::<f32>().to_vec::<f32>().ok();
    match (values(a), values(b)) {
        (Some(a), Some(b)) => a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        _ => false,
    }
}

/// Extract BLIP-2's stage-1 heads from a LAVIS checkpoint into `Blip2Qformer`-relative names for
/// [`crate::qformer::QFormerHeads::load_state_dict`]:
/// - `temp` (0-d) becomes `[1]`;
/// - `Qformer.cls.predictions.decoder.bias` (the same tensor as `…predictions.bias`) is dropped after
///   checking it is equal;
/// - with `tied` (the LAVIS default), `Qformer.cls.predictions.decoder.weight` is dropped after checking
///   it equals `Qformer.bert.embeddings.word_embeddings.weight`; an untied checkpoint is an error (use
///   `tied = false` and a head with its own decoder).
pub fn heads_state_dict(
    sd: &StateDict,
    prefix: &str,
    tied: bool,
) -> Result<StateDict, WeightsError> {
    let sel = subset(sd, |k| is_heads_key(k, prefix));
    if sel.is_empty() {
        return Err(WeightsError::Read {
            path: sd.source.clone(),
            message: format!("no LAVIS stage-1 head keys under prefix `{prefix}`"),
        });
    }
    let p = escape(prefix);
    let mut out = sel.remap(&KeyMap {
        rules: vec![(format!("^{p}"), String::new())],
    })?;
    let err = |message: String| WeightsError::Read {
        path: sd.source.clone(),
        message,
    };
    if out.tensors.contains_key("temp") {
        reshape(&mut out, "temp", vec![1])?;
    }
    let dec_bias = "Qformer.cls.predictions.decoder.bias";
    if out.tensors.contains_key(dec_bias) {
        let a = out.take(dec_bias)?;
        let b = out.data("Qformer.cls.predictions.bias")?;
        if !identical(&a, &b) {
            return Err(err(format!(
                "`{prefix}{dec_bias}` differs from `{prefix}Qformer.cls.predictions.bias` (they are one tensor in LAVIS)"
            )));
        }
    }
    let dec_w = "Qformer.cls.predictions.decoder.weight";
    if tied && out.tensors.contains_key(dec_w) {
        let a = out.take(dec_w)?;
        let word = format!("{prefix}Qformer.bert.embeddings.word_embeddings.weight");
        let b = sd.data(&word)?;
        if !identical(&a, &b) {
            return Err(err(format!(
                "`{prefix}{dec_w}` is not tied to `{word}`; load it with an untied LM head"
            )));
        }
    }
    Ok(out)
}

/// Keys of a LAVIS `BlipDiffusion`-style checkpoint that neither the Q-Former component nor the heads
/// take, restricted to the BLIP-2 part (`prefix`) and `proj_layer.` (for strictness checks).
pub fn unclaimed_blip_keys(sd: &StateDict, prefix: &str) -> Vec<String> {
    sd.keys()
        .filter(|k| k.starts_with(prefix) || k.starts_with("proj_layer."))
        .filter(|k| !is_qformer_key(k, prefix) && !is_heads_key(k, prefix))
        .filter(|k| !k.ends_with("embeddings.position_ids"))
        .cloned()
        .collect()
}
