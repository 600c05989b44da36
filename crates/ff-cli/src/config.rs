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
