//! CaiT-M48-448 feature extractor (timm `cait_m48_448`).
