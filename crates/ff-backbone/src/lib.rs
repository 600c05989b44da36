//! Frozen feature extractors for FastFlow: ResNet18, WideResNet50-2, DeiT and
//! CaiT with timm 0.5.4 key names, and the weight sources that feed them
//! (Hugging Face hub, local safetensors, seeded random init, closed-form
//! fixture weights).

pub mod det_init;
pub mod vit;
