//! `configs/data/pipeline.toml` parses into the crate's option structs and states their defaults.

use blipd_data::openimages::FilterConfig;
use blipd_data::synth::{PipelineConfig, SynthOptions};
use blipd_data::{CfOptions, FgOptions, ReadLimits, TrimapOptions};

#[test]
fn shipped_config_equals_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/data/pipeline.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let p: PipelineConfig = toml::from_str(&text).unwrap();
    assert_eq!(p.filter, FilterConfig::default());
    assert_eq!(p.trimap, TrimapOptions::default());
    assert_eq!(p.matting, CfOptions::default());
    assert_eq!(p.foreground, FgOptions::default());
    assert_eq!(p.read, ReadLimits::default());
    assert_eq!(p.synth, SynthOptions::default());
    assert_eq!(p, PipelineConfig::default());
    let p2 = PipelineConfig::from_file(std::path::Path::new(path)).unwrap();
    assert_eq!(p2, p);
    for bad in [
        text.replace("area_min = 0.3", "area_minn = 0.3"),
        text.replace("rows_per_group = 16", "rows_per_grup = 16"),
        text.replace("mask_source = \"dir\"", "mask_source = \"clipsegg\""),
        format!("{text}\n[extra]\nx = 1\n"),
    ] {
        assert!(
            toml::from_str::<PipelineConfig>(&bad).is_err(),
            "unknown keys/values must be rejected"
        );
    }
    // The OpenImages mask layout, spelt as serde names it or as the CLI flag does.
    for spelling in ["open_images", "openimages"] {
        let t = text.replace(
            "mask_source = \"dir\"",
            &format!("mask_source = {spelling:?}"),
        );
        let p: PipelineConfig = toml::from_str(&t).unwrap();
        assert_eq!(
            p.synth.mask_source,
            blipd_data::masks::MaskSource::OpenImages
        );
    }
}
