//! ProjLayer vs diffusers 0.33.1 `modeling_blip2.ProjLayer` (tests/fixtures/proj, gen_proj.py).

use blipd_models::proj::{reverse_key_map, ProjConfig};
use blipd_models::read_json;
use blipd_models::weights::{collect_reference, StateDict};

use crate::common::*;

#[test]
fn proj_layer_matches_diffusers() {
    let cfg: ProjConfig = read_json(&fixture_dir("proj").join("config.json")).unwrap();
    assert_eq!(
        cfg,
        ProjConfig::tiny(),
        "fixture config differs from ProjConfig::tiny()"
    );
    let model = cfg
        .init::<B>(&device())
        .unwrap()
        .load(weights("proj"))
        .unwrap();
    let io = io("proj");
    let y = model.forward(tensor::<3>(&io, "x"));
    assert_close("proj y", y, tensor::<3>(&io, "y"), 1e-4);
}

#[test]
fn proj_layer_round_trips_reference_names() {
    let model = ProjConfig::tiny()
        .init::<B>(&device())
        .unwrap()
        .load(weights("proj"))
        .unwrap();
    let saved = collect_reference(&model, &reverse_key_map()).unwrap();
    let names: Vec<&str> = saved.iter().map(|(k, _)| k.as_str()).collect();
    let reference = weights("proj");
    let mut expected: Vec<&str> = reference.keys().map(String::as_str).collect();
    expected.sort();
    assert_eq!(names, expected);
    // Reload what we saved: same outputs.
    let again = ProjConfig::tiny()
        .init::<B>(&device())
        .unwrap()
        .load(StateDict::from_tensors("saved", saved))
        .unwrap();
    let io = io("proj");
    assert_close(
        "proj reload",
        again.forward(tensor::<3>(&io, "x")),
        tensor::<3>(&io, "y"),
        1e-4,
    );
}

#[test]
fn proj_layer_rejects_bad_configs() {
    let mut c = ProjConfig::tiny();
    c.out_dim = 16;
    assert!(c.init::<B>(&device()).is_err());
}

#[test]
fn proj_layer_load_reports_missing_keys() {
    let mut sd = weights("proj");
    sd.drop_keys(|k| k.starts_with("dense2."));
    let err = ProjConfig::tiny()
        .init::<B>(&device())
        .unwrap()
        .load(sd)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("dense2.weight") && err.contains("dense2.bias"),
        "{err}"
    );
}

/// The released qformer/, text_encoder/ and vae/ weights are PyTorch `.bin` (torch.save zip + pickle):
/// read them without executing pickle code (fixtures from scripts/reference/gen_pytorch_bin.py).
#[test]
fn pytorch_bin_loads_like_safetensors() {
    let dir = fixture_dir("pytorch_bin");
    let io = io("proj");
    let from_bin = ProjConfig::tiny()
        .init::<B>(&device())
        .unwrap()
        .load(StateDict::read(&dir.join("proj.bin")).unwrap())
        .unwrap();
    let y = from_bin.forward(tensor::<3>(&io, "x"));
    assert_close("proj y from .bin", y, tensor::<3>(&io, "y"), 1e-4);

    // LAVIS-style nested checkpoints: {"model": state_dict, ...}.
    let nested = StateDict::read_pytorch(&dir.join("nested.bin"), Some("model")).unwrap();
    assert_eq!(nested.len(), weights("proj").len());
}

#[test]
fn pytorch_bin_never_runs_pickle_code() {
    const MARKER: &str = "/tmp/blipd-pickle-was-executed";
    let _ = std::fs::remove_file(MARKER);
    let result = StateDict::read(&fixture_dir("pytorch_bin").join("evil.bin"));
    assert!(
        !std::path::Path::new(MARKER).exists(),
        "loading evil.bin executed its os.system payload"
    );
    match result {
        Err(e) => println!("evil.bin refused: {e}"),
        Ok(sd) => {
            // Only real tensors may come out of it; the payload must not be materialised as one.
            let keys: Vec<&String> = sd.keys().collect();
            assert!(
                keys.iter().all(|k| k.starts_with("dense1.weight")),
                "unexpected entries {keys:?}"
            );
        }
    }
}
