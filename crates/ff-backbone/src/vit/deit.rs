//! DeiT-base-distilled-384 feature extractor (timm `deit_base_distilled_patch16_384`).
