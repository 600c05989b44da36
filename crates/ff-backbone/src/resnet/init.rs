//! timm's random initialisation of a ResNet (`ResNet.init_weights`), value
//! by value from a seed and the tensor's key, for `--weights random`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::closed_form::fnv1a32;
use crate::kind::BackboneKind;

/// The role a tensor plays in a timm ResNet, from its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResNetRole {
    ConvWeight,
    NormWeight,
    ZeroedNormWeight,
    NormBias,
    RunningMean,
    RunningVar,
    Other,
}

fn resnet_role(kind: BackboneKind, key: &str, dims: &[usize]) -> ResNetRole {
    let (module, last) = key.rsplit_once('.').unwrap_or(("", key));
    // timm's zero_init_last_bn zeroes the final BatchNorm of every residual
    // block: bn2 in BasicBlock (resnet18), bn3 in Bottleneck (wide_resnet50_2).
    let last_bn = match kind {
        BackboneKind::ResNet18 => "bn2",
        _ => "bn3",
    };
    let in_block = module.starts_with("layer");
    let module_leaf = module.rsplit('.').next().unwrap_or(module);
    match (last, dims.len()) {
        ("weight", 4) => ResNetRole::ConvWeight,
        ("weight", 1) if in_block && module_leaf == last_bn => ResNetRole::ZeroedNormWeight,
        ("weight", 1) => ResNetRole::NormWeight,
        ("bias", 1) => ResNetRole::NormBias,
        ("running_mean", _) => ResNetRole::RunningMean,
        ("running_var", _) => ResNetRole::RunningVar,
        _ => ResNetRole::Other,
    }
}

/// The value stream of one tensor: depends only on the seed and the key, so
/// the values do not depend on the order in which a model asks for them.
fn key_rng(seed: u64, key: &str) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::from(fnv1a32(key)));
    rng
}

/// timm's `ResNet.init_weights` for the tensor `key` of shape `dims`:
/// convolutions kaiming-normal with mode fan_out and ReLU gain
/// (std = sqrt(2 / (out_channels * kh * kw))), BatchNorm weight 1 and bias 0,
/// running statistics at their fresh values (mean 0, var 1), and the last
/// BatchNorm weight of every residual block 0.
pub fn resnet_random_value(kind: BackboneKind, key: &str, dims: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = dims.iter().product();
    match resnet_role(kind, key, dims) {
        ResNetRole::ConvWeight => {
            let fan_out = dims[0] * dims[2] * dims[3];
            let std = (2.0 / fan_out.max(1) as f64).sqrt() as f32;
            let mut rng = key_rng(seed, key);
            (0..n)
                .map(|_| std * rng.sample::<f32, _>(StandardNormal))
                .collect()
        }
        ResNetRole::NormWeight | ResNetRole::RunningVar => vec![1.0; n],
        ResNetRole::ZeroedNormWeight | ResNetRole::NormBias | ResNetRole::RunningMean => {
            vec![0.0; n]
        }
        // Nothing else exists in layers 1-3 of a timm ResNet; a zero is the
        // neutral answer should a caller ask for, e.g., a bias.
        ResNetRole::Other => vec![0.0; n],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_values_do_not_depend_on_request_order() {
        let k = BackboneKind::ResNet18;
        let a = resnet_random_value(k, "layer1.0.conv1.weight", &[64, 64, 3, 3], 7);
        let _ = resnet_random_value(k, "conv1.weight", &[64, 3, 7, 7], 7);
        let b = resnet_random_value(k, "layer1.0.conv1.weight", &[64, 64, 3, 3], 7);
        assert_eq!(a, b);
        let c = resnet_random_value(k, "layer1.0.conv1.weight", &[64, 64, 3, 3], 8);
        assert_ne!(a, c);
        let d = resnet_random_value(k, "layer1.0.conv2.weight", &[64, 64, 3, 3], 7);
        assert_ne!(a, d);
    }

    #[test]
    fn zeroed_norm_is_the_last_of_each_block() {
        let r18 = BackboneKind::ResNet18;
        let wrn = BackboneKind::WideResNet50_2;
        assert_eq!(
            resnet_role(r18, "layer2.1.bn2.weight", &[128]),
            ResNetRole::ZeroedNormWeight
        );
        assert_eq!(
            resnet_role(wrn, "layer2.1.bn2.weight", &[256]),
            ResNetRole::NormWeight
        );
        assert_eq!(
            resnet_role(wrn, "layer3.0.bn3.weight", &[1024]),
            ResNetRole::ZeroedNormWeight
        );
        assert_eq!(
            resnet_role(r18, "bn1.weight", &[64]),
            ResNetRole::NormWeight
        );
        assert_eq!(
            resnet_role(r18, "layer1.0.downsample.1.weight", &[64]),
            ResNetRole::NormWeight
        );
    }
}
