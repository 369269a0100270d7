//! `configs/data/pipeline.toml` parses into the crate's option structs and states their defaults.

use blipd_data::openimages::FilterConfig;
use blipd_data::{CfOptions, FgOptions, ReadLimits, TrimapOptions};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Pipeline {
    filter: FilterConfig,
    trimap: TrimapOptions,
    matting: CfOptions,
    foreground: FgOptions,
    read: ReadLimits,
}

#[test]
fn shipped_config_equals_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/data/pipeline.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let p: Pipeline = toml::from_str(&text).unwrap();
    assert_eq!(p.filter, FilterConfig::default());
    assert_eq!(p.trimap, TrimapOptions::default());
    assert_eq!(p.matting, CfOptions::default());
    assert_eq!(p.foreground, FgOptions::default());
    assert_eq!(p.read, ReadLimits::default());
    let bad = text.replace("area_min = 0.3", "area_minn = 0.3");
    assert!(
        toml::from_str::<Pipeline>(&bad).is_err(),
        "unknown keys must be rejected"
    );
}
