//! Loading model configs from YAML files with the reference's keys
//! (`input_size`, `backbone_name`, `flow_step`, `hidden_ratio`, `conv3x3_only`).
//! Unknown keys and wrong types are errors naming the key and the file.

use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;

/// Reads and parses the YAML file at `path` into `T`.
///
/// The error names the file and, through serde_yaml_ng's message, the key,
/// line and column at fault (for example ``unknown field `flow_steps` ``).
pub fn load_yaml<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file '{}'", path.display()))?;
    parse_yaml(&text).with_context(|| format!("invalid config file '{}'", path.display()))
}

/// Parses YAML text into `T`, keeping serde's description of the offending key.
pub fn parse_yaml<T: DeserializeOwned>(text: &str) -> Result<T> {
    let value: T = serde_yaml_ng::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(value)
}

/// Loads and validates a FastFlow model config; every error names the file.
pub fn load_model_config(path: &Path) -> Result<ff_flow::FastFlowConfig> {
    let cfg: ff_flow::FastFlowConfig = load_yaml(path)?;
    cfg.validate()
        .with_context(|| format!("invalid config file '{}'", path.display()))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_configs_load() -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        for (name, steps) in [
            ("resnet18", 8),
            ("wide_resnet50_2", 8),
            ("deit", 20),
            ("cait", 20),
        ] {
            let cfg = load_model_config(&root.join(format!("{name}.yaml")))?;
            assert_eq!(cfg.flow_step, steps, "{name}");
        }
        Ok(())
    }

    #[test]
    fn errors_name_key_and_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("my.yaml");
        std::fs::write(&path, "backbone_name: resnet18\ninput_size: 64\nflow_step: 2\nhidden_ratio: 1.0\nconv3x3_only: true\nlr: 0.1\n")?;
        let e = format!("{:#}", load_model_config(&path).unwrap_err());
        assert!(
            e.contains("my.yaml") && e.contains("unknown field `lr`"),
            "{e}"
        );
        std::fs::write(&path, "backbone_name: resnet18\ninput_size: big\nflow_step: 2\nhidden_ratio: 1.0\nconv3x3_only: true\n")?;
        let e = format!("{:#}", load_model_config(&path).unwrap_err());
        assert!(e.contains("my.yaml") && e.contains("input_size"), "{e}");
        std::fs::write(
            &path,
            "backbone_name: resnet18\ninput_size: 64\nflow_step: 2\nhidden_ratio: 1.0\n",
        )?;
        let e = format!("{:#}", load_model_config(&path).unwrap_err());
        assert!(e.contains("missing field `conv3x3_only`"), "{e}");
        Ok(())
    }
}
