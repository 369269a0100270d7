//! Q-Former vs diffusers 0.33.1 `Blip2QFormerModel` and LAVIS 1.0.2 `Qformer.py` (stage-1 modes and
//! heads) — tests/fixtures/qformer, gen_qformer.py.

use blipd_models::qformer::{
    itg_decoder_input_ids, reverse_key_map, Blip2Config, Blip2QFormerModel, QFormerHeads,
    QFormerHeadsConfig, QueryCache,
};
use blipd_models::weights::{collect_reference, lavis, StateDict};
use burn::prelude::*;

use crate::common::*;

fn config() -> Blip2Config {
    Blip2Config::from_file(&fixture_dir("qformer").join("config.json")).unwrap()
}

fn model() -> Blip2QFormerModel<B> {
    config()
        .init::<B>(&device())
        .unwrap()
        .load_state_dict(weights("qformer"))
        .unwrap()
}

fn lavis_weights() -> StateDict {
    StateDict::read(&fixture_dir("qformer").join("weights_lavis.safetensors")).unwrap()
}

fn heads() -> QFormerHeads<B> {
    let sd = lavis::heads_state_dict(&lavis_weights(), lavis::BLIP_PREFIX, true).unwrap();
    QFormerHeadsConfig::tiny()
        .init::<B>(&device())
        .unwrap()
        .load_state_dict(sd)
        .unwrap()
}

#[test]
fn config_parses_diffusers_blip2_config() {
    let c = config();
    assert_eq!(
        c,
        Blip2Config::tiny(),
        "fixture config differs from Blip2Config::tiny()"
    );
    assert_eq!(
        c.qformer_config.encoder_hidden_size,
        c.vision_config.hidden_size
    );
    // transformers overwrites encoder_hidden_size with the vision width.
    let c: Blip2Config = serde_json::from_str(
        r#"{"num_query_tokens": 16, "vision_config": {"hidden_size": 1024},
            "qformer_config": {"encoder_hidden_size": 1408, "cross_attention_frequency": 1}}"#,
    )
    .unwrap();
    assert_eq!(c.qformer_config.encoder_hidden_size, 1024);
    let b = Blip2Config::blipdiffusion();
    assert_eq!(
        (
            b.num_query_tokens,
            b.qformer_config.vocab_size,
            b.vision_config.num_hidden_layers
        ),
        (16, 30523, 23)
    );
}

#[test]
fn ctx_embeddings_match_diffusers() {
    let m = model();
    let io = io("qformer");
    let ids = int_tensor::<2>(&io, "input_ids");
    let mask = int_tensor::<2>(&io, "attention_mask");
    let pixels = tensor::<4>(&io, "pixel_values");
    let image = m.image_embeds(pixels.clone());
    assert_close(
        "qformer image_embeds",
        image.clone(),
        tensor::<3>(&io, "image_embeds"),
        1e-4,
    );
    let hidden = m.multimodal(&image, ids.clone(), mask.clone());
    assert_close(
        "qformer last_hidden (bidirectional)",
        hidden,
        tensor::<3>(&io, "last_hidden"),
        1e-4,
    );
    let ctx = m.forward(pixels, ids, mask);
    assert_eq!(ctx.dims(), [2, 4, 32]);
    assert_close(
        "qformer ctx = proj_layer(last_hidden[:, :Q])",
        ctx,
        tensor::<3>(&io, "ctx"),
        1e-4,
    );
}

#[test]
fn unimodal_passes_match_lavis() {
    let m = model();
    let io = io("qformer");
    let image = tensor::<3>(&io, "image_embeds");
    let (q, cache) = m.query_pass(&image);
    assert_close(
        "qformer query pass",
        q,
        tensor::<3>(&io, "query_hidden"),
        1e-4,
    );
    assert_eq!(cache.layers.len(), 3);
    for (i, (k, v)) in cache.layers.iter().enumerate() {
        assert_close(
            &format!("query K layer {i}"),
            k.clone(),
            tensor::<4>(&io, &format!("query_past_k_{i}")),
            1e-4,
        );
        assert_close(
            &format!("query V layer {i}"),
            v.clone(),
            tensor::<4>(&io, &format!("query_past_v_{i}")),
            1e-4,
        );
    }
    let t = m.text_pass(
        int_tensor::<2>(&io, "input_ids"),
        int_tensor::<2>(&io, "attention_mask"),
    );
    assert_close(
        "qformer text pass",
        t,
        tensor::<3>(&io, "text_hidden"),
        1e-4,
    );
}

#[test]
fn itg_causal_text_matches_lavis_both_ways() {
    let m = model();
    let h = heads();
    let io = io("qformer");
    let image = tensor::<3>(&io, "image_embeds");
    let ids = itg_decoder_input_ids(
        int_tensor::<2>(&io, "input_ids"),
        QFormerHeadsConfig::tiny().dec_token_id,
    );
    assert_eq!(
        ids.clone().into_data(),
        int_tensor::<2>(&io, "decoder_input_ids").into_data()
    );
    let mask = int_tensor::<2>(&io, "attention_mask");
    let (_, cache) = m.query_pass(&image);
    let cached = m.causal_text_cached(&cache, ids.clone(), mask.clone());
    assert_close(
        "ITG text states (cached K/V)",
        cached.clone(),
        tensor::<3>(&io, "itg_hidden"),
        1e-4,
    );
    let logits = h.lm_logits(cached, &m.embeddings.word_embeddings);
    assert_close(
        "ITG logits (cached K/V)",
        logits,
        tensor::<3>(&io, "itg_logits"),
        1e-4,
    );

    let recomputed = m.causal_text(&image, ids, mask);
    assert_close(
        "ITG text states (recomputed)",
        recomputed.clone(),
        tensor::<3>(&io, "itg_hidden"),
        1e-4,
    );
    let logits = h.lm_logits(recomputed, &m.embeddings.word_embeddings);
    assert_close(
        "ITG logits (recomputed)",
        logits,
        tensor::<3>(&io, "itg_logits_recompute"),
        1e-4,
    );
}

#[test]
fn itg_is_causal() {
    // Changing the last text token must not change earlier text states.
    let m = model();
    let io = io("qformer");
    let image = tensor::<3>(&io, "image_embeds");
    let ids = int_tensor::<2>(&io, "decoder_input_ids");
    let mask = int_tensor::<2>(&io, "attention_mask");
    let (_, cache) = m.query_pass(&image);
    let a = m.causal_text_cached(&cache, ids.clone(), mask.clone());
    let [b, t] = ids.dims();
    let last = Tensor::<B, 2, Int>::full([b, 1], 9, &device());
    let ids2 = ids.slice_assign([0..b, t - 1..t], last);
    let b2 = m.causal_text_cached(&cache, ids2, mask);
    let head = |x: Tensor<B, 3>| x.slice([0..b, 0..t - 1, 0..32]);
    assert_close(
        "ITG prefix unchanged",
        head(b2.clone()),
        head(a.clone()),
        0.0,
    );
    let d = (b2 - a).abs().max().into_scalar();
    assert!(d > 1e-3, "the changed token's state should change ({d})");
}

#[test]
fn stage1_heads_match_lavis() {
    let m = model();
    let h = heads();
    let io = io("qformer");
    let image_feats = h.image_feats(tensor::<3>(&io, "query_hidden"));
    assert_close(
        "ITC image_feats",
        image_feats.clone(),
        tensor::<3>(&io, "image_feats"),
        1e-4,
    );
    let text_feat = h.text_feat(tensor::<3>(&io, "text_hidden"));
    assert_close(
        "ITC text_feat",
        text_feat.clone(),
        tensor::<2>(&io, "text_feat"),
        1e-4,
    );
    let (i2t, t2i) = h.similarity(image_feats, text_feat);
    assert_close("ITC sim_i2t", i2t, tensor::<2>(&io, "sim_i2t"), 1e-4);
    assert_close("ITC sim_t2i", t2i, tensor::<2>(&io, "sim_t2i"), 1e-4);
    let itm = h.itm_logits(tensor::<3>(&io, "last_hidden"), m.num_query_tokens());
    assert_close("ITM logits", itm, tensor::<2>(&io, "itm_logits"), 1e-4);
    let temp = h.temp.val().into_scalar();
    assert!((temp - 0.05).abs() < 1e-7, "temp {temp}");
}

/// The LAVIS `BlipDiffusion` layout (`blip.*` + `proj_layer.*`) loads through the LAVIS map into the
/// same model: identical ctx embeddings.
#[test]
fn lavis_checkpoint_loads_into_the_diffusers_component() {
    let sd = lavis_weights();
    assert!(lavis::unclaimed_blip_keys(&sd, lavis::BLIP_PREFIX).is_empty());
    let converted = lavis::to_diffusers_qformer(&sd, lavis::BLIP_PREFIX).unwrap();
    // Same key set as the diffusers checkpoint (minus the position_ids buffer).
    let mut reference = weights("qformer");
    reference.drop_keys(|k| k.ends_with("position_ids"));
    let a: Vec<&String> = converted.keys().collect();
    let b: Vec<&String> = reference.keys().collect();
    assert_eq!(a, b);
    let m = config()
        .init::<B>(&device())
        .unwrap()
        .load_state_dict(converted)
        .unwrap();
    let io = io("qformer");
    let ctx = m.forward(
        tensor::<4>(&io, "pixel_values"),
        int_tensor::<2>(&io, "input_ids"),
        int_tensor::<2>(&io, "attention_mask"),
    );
    assert_close(
        "ctx from LAVIS-layout weights",
        ctx,
        tensor::<3>(&io, "ctx"),
        1e-4,
    );

    // Back to LAVIS names: the inverse map reproduces the LAVIS keys and shapes.
    let back = lavis::from_diffusers_qformer(&weights("qformer"), lavis::BLIP_PREFIX).unwrap();
    for (k, snap) in &back.tensors {
        let orig = sd
            .tensors
            .get(k)
            .unwrap_or_else(|| panic!("{k} not a LAVIS key"));
        assert_eq!(snap.shape, orig.shape, "{k}");
    }
    let n_lavis = sd
        .keys()
        .filter(|k| lavis::is_qformer_key(k, lavis::BLIP_PREFIX))
        .count();
    assert_eq!(back.len(), n_lavis);
}

#[test]
fn lavis_heads_reject_untied_decoder() {
    let mut sd = lavis_weights();
    let key = "blip.Qformer.cls.predictions.decoder.weight";
    let w = sd.take(key).unwrap();
    let bumped: Vec<f32> = w.to_vec::<f32>().unwrap().iter().map(|x| x + 1.0).collect();
    sd.insert(key, TensorData::new(bumped, w.shape.clone()));
    let err = match lavis::heads_state_dict(&sd, lavis::BLIP_PREFIX, true) {
        Ok(_) => panic!("an untied decoder must be rejected for a tied head"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("not tied"), "{err}");
    // An untied head takes the decoder as its own weight.
    let sd = lavis::heads_state_dict(&sd, lavis::BLIP_PREFIX, false).unwrap();
    let cfg = QFormerHeadsConfig {
        tie_word_embeddings: false,
        ..QFormerHeadsConfig::tiny()
    };
    cfg.init::<B>(&device())
        .unwrap()
        .load_state_dict(sd)
        .unwrap();
}

#[test]
fn qformer_saves_diffusers_names() {
    let m = model();
    let saved = collect_reference(&m, &reverse_key_map()).unwrap();
    let names: Vec<&str> = saved.iter().map(|(k, _)| k.as_str()).collect();
    let mut reference = weights("qformer");
    reference.drop_keys(|k| k.ends_with("position_ids"));
    let expected: Vec<&str> = reference.keys().map(String::as_str).collect();
    assert_eq!(names, expected);
}

#[test]
fn query_cache_reports_length() {
    let m = model();
    let io = io("qformer");
    let (_, cache): (_, QueryCache<B>) = m.query_pass(&tensor::<3>(&io, "image_embeds"));
    assert_eq!(cache.len(), 4);
}

/// Full-size BLIP-Diffusion image side. Reference counts from diffusers 0.33.1 `Blip2QFormerModel`
/// built with `Salesforce/blipdiffusion`'s `qformer/config.json` values (on the meta device):
/// total 493,983,744 = visual_encoder 290,583,552 + embeddings 23,836,416 + encoder 174,827,520 +
/// proj_layer 4,723,968 + query_tokens 12,288. Stage-1 heads (LAVIS, decoder tied): 1,017,918.
#[test]
fn full_size_parameter_counts() {
    use blipd_models::clip_vision::Blip2VisionConfig;
    use blipd_models::proj::ProjConfig;
    use blipd_models::weights::num_params;

    let m = Blip2Config::blipdiffusion().init::<B>(&device()).unwrap();
    assert_eq!(num_params(&m.visual_encoder), 290_583_552);
    assert_eq!(num_params(&m.embeddings), 23_836_416);
    assert_eq!(num_params(&m.encoder), 174_827_520);
    assert_eq!(num_params(&m.proj_layer), 4_723_968);
    assert_eq!(num_params(&m), 493_983_744);
    let v = Blip2VisionConfig::blipdiffusion()
        .init::<B>(&device())
        .unwrap();
    assert_eq!(num_params(&v), 290_583_552);
    let p = ProjConfig::blipdiffusion().init::<B>(&device()).unwrap();
    assert_eq!(num_params(&p), 4_723_968);
    let h = QFormerHeadsConfig::blipdiffusion()
        .init::<B>(&device())
        .unwrap();
    assert_eq!(num_params(&h), 1_017_918);
}
