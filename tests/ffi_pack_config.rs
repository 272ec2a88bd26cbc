//! `dynq_pack_config` through the C ABI: `weight_qmax` quantizes f32 weights to
//! [-qmax, qmax] exactly as the Rust API does (and runs the narrow-weight kernel where the ISA
//! has one, with the same output bits as every other kernel), and a caller compiled against the
//! earlier 12-byte struct (without `weight_qmax`) still packs with the defaults.

mod common;

use common::isas_under_test;
use dynq::ffi::*;
use dynq::{GemmOptions, PackOptions, PackedWeights, Status, WeightLayout};
use std::ffi::CStr;

/// The struct as callers built before `weight_qmax` was added.
#[repr(C)]
struct PackConfigV1 {
    struct_size: u32,
    granularity: u32,
    isa: u32,
}

fn weights(n: usize, k: usize) -> Vec<f32> {
    (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0 * (1.0 + (i % 7) as f32)).collect()
}

/// Packs through the C ABI and returns the handle's int8 weights (from the portable blob), its
/// kernel name and the product of a fixed activation matrix.
fn pack_ffi(
    w: &[f32],
    n: usize,
    k: usize,
    cfg: *const dynq_pack_config,
) -> Result<(Vec<i8>, String, Vec<f32>), Status> {
    let mut p = std::ptr::null_mut();
    // SAFETY (whole function): buffers of the sizes passed; `cfg` is NULL or a config.
    unsafe {
        let st = dynq_pack_weights(w.as_ptr(), n, k, 0, cfg, &mut p);
        if st != Status::Ok {
            assert!(p.is_null());
            return Err(st);
        }
        let mut info = std::mem::zeroed::<dynq_packed_weights_info>();
        info.struct_size = std::mem::size_of::<dynq_packed_weights_info>() as u32;
        assert_eq!(dynq_packed_weights_get_info(p, &mut info), Status::Ok);
        let name = CStr::from_ptr(info.kernel_name).to_str().unwrap().to_string();
        let mut blob = vec![0u8; info.serialized_bytes];
        let mut written = 0;
        assert_eq!(dynq_packed_weights_serialize(p, blob.as_mut_ptr(), blob.len(), &mut written), Status::Ok);
        let pw = PackedWeights::deserialize(&blob, PackOptions { isa: Some(dynq::Isa::Scalar), ..Default::default() })
            .unwrap();
        let m = 7;
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 13 % 29) as f32 - 14.0) / 5.0).collect();
        let mut y = vec![0f32; m * n];
        assert_eq!(dynq_gemm(p, a.as_ptr(), m, k, std::ptr::null(), y.as_mut_ptr(), n, std::ptr::null()), Status::Ok);
        dynq_packed_weights_free(p);
        Ok((pw.quantized_weights(), name, y))
    }
}

#[test]
fn weight_qmax_quantizes_to_its_range_with_the_same_bits_everywhere() {
    let (n, k) = (40, 77);
    let w = weights(n, k);
    let mut want: Option<Vec<f32>> = None;
    for isa in isas_under_test() {
        for qmax in [0u32, 127, 64, 63, 1] {
            let mut cfg = unsafe { std::mem::zeroed::<dynq_pack_config>() };
            // SAFETY: a writable config.
            assert_eq!(
                unsafe { dynq_pack_config_init_sized(&mut cfg, std::mem::size_of::<dynq_pack_config>()) },
                Status::Ok
            );
            assert_eq!(cfg.weight_qmax, 0, "the default");
            cfg.isa = isa.to_raw();
            cfg.weight_qmax = qmax;
            let (q, name, y) = pack_ffi(&w, n, k, &cfg).unwrap();
            let lim = if qmax == 0 { 127 } else { qmax as i32 };
            // Every channel reaches its limit (its largest weight) and none passes it.
            for row in q.chunks(k) {
                assert_eq!(row.iter().map(|&v| (v as i32).abs()).max(), Some(lim), "{isa} qmax={qmax}");
            }
            // What the Rust API gives with the same qmax: the same int8 weights and output bits.
            let opts = PackOptions { isa: Some(isa), weight_qmax: lim as u8, ..Default::default() };
            let pw = PackedWeights::from_f32(&w, n, k, WeightLayout::NK, opts).unwrap();
            assert_eq!(pw.quantized_weights(), q);
            assert_eq!(pw.kernel().name, name);
            let kern = dynq::kernels::kernel_for(isa).unwrap();
            if lim <= 64 {
                assert_eq!(name, kern.narrow.unwrap_or(kern).name, "{isa} qmax={qmax}");
            }
            if qmax == 64 {
                // One reference for the qmax = 64 outputs: every ISA (narrow kernel or not)
                // gives its bits.
                let mut yr = vec![0f32; y.len()];
                let a: Vec<f32> = (0..7 * k).map(|i| ((i * 13 % 29) as f32 - 14.0) / 5.0).collect();
                dynq::gemm(&pw, &a, 7, k, None, &mut yr, n, &GemmOptions::default()).unwrap();
                assert_eq!(
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    yr.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
                match &want {
                    None => want = Some(y),
                    Some(w0) => {
                        assert!(w0.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()), "{isa}: bits differ")
                    }
                }
            }
        }
    }
}

/// The exported `dynq_pack_config_init`, which programs built before `weight_qmax` call, writes
/// the first 12 bytes only; the sized form writes exactly the size given.
#[test]
fn init_writes_only_the_callers_struct() {
    for (size, call_sized) in [(12usize, false), (12, true), (16, true)] {
        #[repr(C, align(8))]
        struct Buf([u8; 20]);
        let mut buf = Buf([0xAB; 20]);
        let raw = &mut buf.0;
        // SAFETY: 20 writable bytes, aligned for the struct, more than either size.
        let st = unsafe {
            let p = raw.as_mut_ptr() as *mut dynq_pack_config;
            if call_sized {
                dynq_pack_config_init_sized(p, size)
            } else {
                dynq_pack_config_init(p)
            }
        };
        assert_eq!(st, Status::Ok);
        assert_eq!(u32::from_ne_bytes(raw[..4].try_into().unwrap()) as usize, size);
        assert!(raw[4..size].iter().all(|&b| b == 0), "defaults are zeros");
        assert!(raw[size..].iter().all(|&b| b == 0xAB), "wrote past {size} bytes");
    }
}

#[test]
fn a_config_of_the_earlier_size_means_the_defaults() {
    let (n, k) = (24, 50);
    let w = weights(n, k);
    let v1 = PackConfigV1 { struct_size: std::mem::size_of::<PackConfigV1>() as u32, granularity: 0, isa: 0 };
    assert_eq!(v1.struct_size, 12);
    let (q_old, name_old, y_old) = pack_ffi(&w, n, k, &v1 as *const PackConfigV1 as *const dynq_pack_config).unwrap();
    let (q_def, name_def, y_def) = pack_ffi(&w, n, k, std::ptr::null()).unwrap();
    assert_eq!((q_old, name_old), (q_def, name_def));
    assert_eq!(
        y_old.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        y_def.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    // Its other fields are read (here the forced ISA).
    let v1 = PackConfigV1 { struct_size: 12, granularity: 1, isa: dynq::Isa::Scalar.to_raw() };
    let (_, name, _) = pack_ffi(&w, n, k, &v1 as *const PackConfigV1 as *const dynq_pack_config).unwrap();
    assert_eq!(name, dynq::kernels::kernel_for(dynq::Isa::Scalar).unwrap().name);
    for bad in [128u32, 255, 1000, u32::MAX] {
        let mut cfg = unsafe { std::mem::zeroed::<dynq_pack_config>() };
        // SAFETY: a writable config.
        assert_eq!(
            unsafe { dynq_pack_config_init_sized(&mut cfg, std::mem::size_of::<dynq_pack_config>()) },
            Status::Ok
        );
        cfg.weight_qmax = bad;
        assert_eq!(pack_ffi(&w, n, k, &cfg).unwrap_err(), Status::InvalidArgument, "weight_qmax={bad}");
    }
}
