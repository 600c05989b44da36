//! Vision-transformer backbones (DeiT, CaiT) with timm 0.5.4 key names.

pub mod cait;
pub mod deit;
