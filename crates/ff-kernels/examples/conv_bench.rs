//! GFLOP/s of the convolution kernels on the layer shapes of resnet18 @ 256
//! and its flows, batch 8, and of the linear layers of DeiT-384 (4 images):
//! `cargo run --release -p ff-kernels --example conv_bench [filter]`, where
//! `filter` keeps the layers whose name contains it; `CONV_BENCH_BATCH=n`
//! times batches of n images instead of 8.

use std::time::Instant;

use ff_kernels::{
    conv2d, conv2d_weight_grad_with, linear, Activation, Algorithm, ConvGeometry, Epilogue, Isa,
    NhwcMut, NhwcRef, PackedConv2d,
};

// The fastflow CLI runs on mimalloc with freed memory retained; measuring on
// the same allocator keeps page faults out of these numbers as they are out
// of the CLI's (glibc returns large buffers to the kernel on every free).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The shortest of `reps` timed runs of `f`, in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

/// Max |got - f64 reference| / max |reference| of one image through `packed`
/// (random inputs and weights in [-1, 1)), for the error of each algorithm.
fn relative_error(g: ConvGeometry, algorithm: Algorithm, h: usize) -> f64 {
    let (c, o, k, p) = (g.in_channels, g.out_channels, g.kernel, g.padding);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let x: Vec<f32> = (0..h * h * c).map(|_| next()).collect();
    let wt: Vec<f32> = (0..o * c * k * k)
        .map(|_| next() / (c * k * k) as f32)
        .collect();
    let packed = PackedConv2d::from_oihw(g, Some(algorithm), &wt, None).unwrap();
    let mut out = vec![0f32; h * h * o];
    conv2d(
        &packed,
        NhwcRef::new(&x, [1, h, h, c]).unwrap(),
        Activation::Identity,
        Epilogue::default(),
        NhwcMut::new(&mut out, [1, h, h, o]).unwrap(),
    )
    .unwrap();
    let (mut max_err, mut max_ref) = (0f64, 0f64);
    for y in 0..h {
        for xx in 0..h {
            for oo in 0..o {
                let mut acc = 0f64;
                for ky in 0..k {
                    for kx in 0..k {
                        let (iy, ix) = (
                            (y + ky) as isize - p as isize,
                            (xx + kx) as isize - p as isize,
                        );
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= h as isize {
                            continue;
                        }
                        for ci in 0..c {
                            acc += f64::from(x[((iy as usize) * h + ix as usize) * c + ci])
                                * f64::from(wt[((oo * c + ci) * k + ky) * k + kx]);
                        }
                    }
                }
                max_ref = max_ref.max(acc.abs());
                max_err = max_err.max((f64::from(out[(y * h + xx) * o + oo]) - acc).abs());
            }
        }
    }
    max_err / max_ref
}

fn main() {
    ff_kernels::alloc::retain_freed_memory();
    let filter = std::env::args().nth(1).unwrap_or_default();
    // Batch 8 unless CONV_BENCH_BATCH says otherwise (DeiT's flows train
    // on batches of 32).
    let n: usize = std::env::var("CONV_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    // The error of both algorithms against f64, one image per layer shape.
    for (name, c, o, h) in [
        ("32->64 @64", 32usize, 64usize, 64usize),
        ("64->64 @64", 64, 64, 64),
        ("128->256 @16", 128, 256, 16),
        ("256->256 @16", 256, 256, 16),
    ] {
        let g = ConvGeometry {
            in_channels: c,
            out_channels: o,
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        println!(
            "error vs f64, {name}: direct {:.2e}, winograd {:.2e}, winograd 4x4 {:.2e} (max abs error / max abs output)",
            relative_error(g, Algorithm::Direct, h),
            relative_error(g, Algorithm::Winograd, h),
            relative_error(g, Algorithm::Winograd4x4, h)
        );
    }
    println!("isa: {}", Isa::detect().name());
    // Packing cost per call, as the flows pay it (weights change every step).
    for (c, o) in [(32usize, 64usize), (128, 256)] {
        let g = ConvGeometry {
            in_channels: c,
            out_channels: o,
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        let rows = vec![0.01f32; (9 * c + 1) * o];
        for algorithm in [
            Algorithm::Direct,
            Algorithm::Winograd,
            Algorithm::Winograd4x4,
        ] {
            let t = Instant::now();
            for _ in 0..10 {
                let p = PackedConv2d::from_rows(g, Some(algorithm), &rows).unwrap();
                std::hint::black_box(&p);
            }
            println!(
                "pack {c}->{o} {algorithm:?}: {:.3} ms",
                t.elapsed().as_secs_f64() * 100.0
            );
        }
    }
    // (name, c, o, k, stride, h)
    let layers = [
        ("stem 7x7/2", 3, 64, 7, 2, 256),
        ("layer1 3x3", 64, 64, 3, 1, 64),
        ("layer2 3x3/2", 64, 128, 3, 2, 64),
        ("layer2 3x3", 128, 128, 3, 1, 32),
        ("layer3 3x3", 256, 256, 3, 1, 16),
        ("down 1x1/2", 128, 256, 1, 2, 32),
        ("flow0 3x3 32->32", 32, 32, 3, 1, 64),
        ("flow0 3x3 32->64", 32, 64, 3, 1, 64),
        ("flow1 3x3 64->128", 64, 128, 3, 1, 32),
        ("flow2 3x3 128->256", 128, 256, 3, 1, 16),
        ("flow0 3x3 64->32 (dx)", 64, 32, 3, 1, 64),
        ("flow1 3x3 64->64", 64, 64, 3, 1, 32),
        ("flow1 3x3 128->64 (dx)", 128, 64, 3, 1, 32),
        ("flow2 3x3 128->128", 128, 128, 3, 1, 16),
        ("flow2 3x3 256->128 (dx)", 256, 128, 3, 1, 16),
        ("deit flow 3x3 384->61", 384, 61, 3, 1, 24),
        ("deit flow 3x3 61->768", 61, 768, 3, 1, 24),
        ("deit flow 3x3 61->384 (dx)", 61, 384, 3, 1, 24),
        ("deit flow 3x3 768->61 (dx)", 768, 61, 3, 1, 24),
        ("cait flow 3x3 384->61", 384, 61, 3, 1, 28),
        ("cait flow 3x3 61->768", 61, 768, 3, 1, 28),
    ];
    for (name, c, o, k, s, h) in layers {
        if !name.contains(filter.as_str()) {
            continue;
        }
        let g = ConvGeometry {
            in_channels: c,
            out_channels: o,
            kernel: k,
            stride: s,
            padding: k / 2,
        };
        let x = vec![0.5f32; n * h * h * c];
        let wt = vec![0.01f32; o * c * k * k];
        let packed = PackedConv2d::from_oihw(g, Some(Algorithm::Direct), &wt, None).unwrap();
        let (oh, ow) = g.output_size(h, h).unwrap();
        let mut out = vec![0f32; n * oh * ow * o];
        let flop = 2.0 * (n * oh * ow * o * c * k * k) as f64;
        let x_ref = NhwcRef::new(&x, [n, h, h, c]).unwrap();
        let mut forward = |p: &PackedConv2d| {
            best_of(15, || {
                let dst = NhwcMut::new(&mut out, [n, oh, ow, o]).unwrap();
                conv2d(p, x_ref, Activation::Identity, Epilogue::default(), dst).unwrap();
            })
        };
        let best = forward(&packed);
        let wino = PackedConv2d::from_oihw(g, Some(Algorithm::Winograd), &wt, None)
            .map_or(f64::NAN, |p| forward(&p));
        let wino4 = PackedConv2d::from_oihw(g, Some(Algorithm::Winograd4x4), &wt, None)
            .map_or(f64::NAN, |p| forward(&p));
        // The weight gradient is only measured where the flows need it.
        let wgrad = |algorithm: Algorithm| {
            if s != 1 || (algorithm != Algorithm::Direct && k != 3) {
                return f64::NAN;
            }
            let mut dw = vec![0f32; (k * k * c + 1) * o];
            let gy = NhwcRef::new(&out, [n, oh, ow, o]).unwrap();
            let isa = Isa::detect();
            best_of(7, || {
                conv2d_weight_grad_with(
                    isa,
                    Some(algorithm),
                    g,
                    x_ref,
                    Activation::Identity,
                    gy,
                    &mut dw,
                )
                .unwrap();
            })
        };
        let wdirect = wgrad(Algorithm::Direct);
        let wwino = wgrad(Algorithm::Winograd);
        let wwino4 = wgrad(Algorithm::Winograd4x4);
        println!(
            "{name:22} direct {:6.2} ms {:6.1} GFLOP/s | winograd {:6.2} ms ({:4.2}x) | 4x4 {:6.2} ms ({:4.2}x) | wgrad {:6.2} ms {:6.1} GFLOP/s, winograd {:6.2} ms ({:4.2}x), 4x4 {:6.2} ms ({:4.2}x)",
            best * 1e3,
            flop / best / 1e9,
            wino * 1e3,
            best / wino,
            wino4 * 1e3,
            best / wino4,
            wdirect * 1e3,
            flop / wdirect / 1e9,
            wwino * 1e3,
            wdirect / wwino,
            wwino4 * 1e3,
            wdirect / wwino4,
        );
    }
    // DeiT-base @ 384's linear layers on 4 images (577 tokens each).
    let rows = 4 * 577;
    for (name, c, o, act) in [
        (
            "deit qkv 768->2304",
            768usize,
            2304usize,
            Activation::Identity,
        ),
        ("deit proj 768->768", 768, 768, Activation::Identity),
        ("deit fc1+gelu 768->3072", 768, 3072, Activation::GeluErf),
        ("deit fc2 3072->768", 3072, 768, Activation::Identity),
    ] {
        if !name.contains(filter.as_str()) {
            continue;
        }
        let g = ConvGeometry {
            in_channels: c,
            out_channels: o,
            kernel: 1,
            stride: 1,
            padding: 0,
        };
        let wt = vec![0.01f32; o * c];
        let packed = PackedConv2d::from_oihw(g, Some(Algorithm::Direct), &wt, None).unwrap();
        let x = vec![0.5f32; rows * c];
        let mut out = vec![0f32; rows * o];
        let best = best_of(5, || linear(&packed, &x, act, &mut out).unwrap());
        let flop = 2.0 * (rows * c * o) as f64;
        println!(
            "{name:22} linear {:6.2} ms {:6.1} GFLOP/s",
            best * 1e3,
            flop / best / 1e9
        );
    }
}
