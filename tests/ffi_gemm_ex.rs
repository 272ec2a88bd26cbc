//! `dynq_gemm_ex` through the C ABI: every element-type pair gives what the Rust API gives,
//! and its own argument errors (bad dtype values, misaligned pointers) get a status.

use dynq::ffi::*;
use dynq::{GemmOptions, PackOptions, PackedWeights, Status, WeightLayout};
use half::{bf16, f16};
use std::ffi::c_void;

fn pack(n: usize, k: usize) -> *mut dynq_packed_weights {
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0).collect();
    let mut p = std::ptr::null_mut();
    let st = unsafe { dynq_pack_weights(w.as_ptr(), n, k, 0, std::ptr::null(), &mut p) };
    assert_eq!(st, Status::Ok);
    p
}

#[test]
fn every_dtype_pair_matches_the_rust_api() {
    let (m, n, k) = (5, 19, 40);
    let p = pack(n, k);
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0).collect();
    let pw = PackedWeights::from_f32(&w, n, k, WeightLayout::NK, PackOptions::default()).unwrap();
    let a32: Vec<f32> = (0..m * k).map(|i| ((i * 13 % 29) as f32 - 14.0) / 5.0).collect();
    let a16: Vec<f16> = a32.iter().map(|&v| f16::from_f32(v)).collect();
    let ab: Vec<bf16> = a32.iter().map(|&v| bf16::from_f32(v)).collect();
    let opts = GemmOptions::default();
    for at in 0..3u32 {
        let aptr: *const c_void = match at {
            0 => a32.as_ptr() as _,
            1 => a16.as_ptr() as _,
            _ => ab.as_ptr() as _,
        };
        let want: Vec<f32> = {
            let mut y = vec![0f32; m * n];
            match at {
                0 => dynq::gemm_typed(&pw, &a32, m, k, None, &mut y, n, &opts),
                1 => dynq::gemm_typed(&pw, &a16, m, k, None, &mut y, n, &opts),
                _ => dynq::gemm_typed(&pw, &ab, m, k, None, &mut y, n, &opts),
            }
            .unwrap();
            y
        };
        for yt in 0..3u32 {
            let mut y32 = vec![0f32; m * n];
            let mut y16 = vec![f16::ZERO; m * n];
            let mut yb = vec![bf16::ZERO; m * n];
            let yptr: *mut c_void = match yt {
                0 => y32.as_mut_ptr() as _,
                1 => y16.as_mut_ptr() as _,
                _ => yb.as_mut_ptr() as _,
            };
            let st = unsafe { dynq_gemm_ex(p, aptr, at, m, k, std::ptr::null(), yptr, yt, n, std::ptr::null()) };
            assert_eq!(st, Status::Ok, "a_type={at} y_type={yt}");
            for (i, &v) in want.iter().enumerate() {
                let got = match yt {
                    0 => y32[i].to_bits(),
                    1 => y16[i].to_bits() as u32,
                    _ => yb[i].to_bits() as u32,
                };
                let exp = match yt {
                    0 => v.to_bits(),
                    1 => f16::from_f32(v).to_bits() as u32,
                    _ => bf16::from_f32(v).to_bits() as u32,
                };
                assert_eq!(got, exp, "a_type={at} y_type={yt} [{i}]");
            }
        }
    }
    unsafe { dynq_packed_weights_free(p) };
}

#[test]
fn argument_errors() {
    let (m, n, k) = (2, 3, 4);
    let p = pack(n, k);
    let a = vec![f16::ONE; m * k + 1];
    let mut y = vec![0f32; m * n + 1];
    let call = |aptr: *const c_void, at: u32, yptr: *mut c_void, yt: u32| unsafe {
        dynq_gemm_ex(p, aptr, at, m, k, std::ptr::null(), yptr, yt, n, std::ptr::null())
    };
    let (ap, yp) = (a.as_ptr() as *const c_void, y.as_mut_ptr() as *mut c_void);
    assert_eq!(call(ap, 3, yp, 0), Status::InvalidArgument);
    assert_eq!(call(ap, 1, yp, 7), Status::InvalidArgument);
    assert_eq!(call(std::ptr::null(), 1, yp, 0), Status::NullPointer);
    assert_eq!(call(ap, 1, std::ptr::null_mut(), 0), Status::NullPointer);
    // f16 needs 2-byte alignment, f32 output 4-byte alignment.
    let odd_a = unsafe { (a.as_ptr() as *const u8).add(1) } as *const c_void;
    assert_eq!(call(odd_a, 1, yp, 0), Status::InvalidArgument);
    let odd_y = unsafe { (y.as_mut_ptr() as *mut u8).add(2) } as *mut c_void;
    assert_eq!(call(ap, 1, odd_y, 0), Status::InvalidArgument);
    let mut msg = vec![0u8; 200];
    let len = unsafe { dynq_last_error_message(msg.as_mut_ptr() as *mut _, msg.len()) };
    let msg = String::from_utf8_lossy(&msg[..len.min(199)]).to_string();
    assert!(msg.contains("aligned"), "{msg}");
    // y overlapping a is refused even across element types.
    assert_eq!(call(ap, 1, ap as *mut c_void, 1), Status::InvalidArgument);
    unsafe { dynq_packed_weights_free(p) };
}
