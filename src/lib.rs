//! dynq: dynamic int8 quantization for the linear layers of neural networks.
//!
//! Weights are quantized once to symmetric int8 (per output channel by default) and packed for
//! the best kernel this CPU supports; activations are quantized inside every GEMM call from the
//! range seen in that call (per row, asymmetric uint8 by default); the product runs on exact
//! int32 dot products and is dequantized to f32 with an optional fused bias and ReLU.
//!
//! Guarantees:
//! - The integer part of every kernel equals the plain reference ([`reference`]) exactly.
//! - The f32 output is bit-identical across ISAs and thread counts (see [`gemm`]).
//! - Bad input is reported as an [`Error`] (a `dynq_status` at the C ABI), never a crash.
//!
//! The C ABI lives in [`ffi`]; its header is `include/dynq.h`.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod dtype;
pub mod error;
pub mod ffi;
pub mod gemm;
pub mod isa;
pub mod kernels;
/// cbindgen:ignore
pub mod ort;
pub mod pack;
pub mod peak;
pub mod quant;
pub mod reference;

pub use dtype::{DType, Element};
pub use error::{Error, Result, Status};
pub use gemm::{
    gemm, gemm_fused, gemm_fused_on, gemm_i32, gemm_smoothed_on, gemm_split, gemm_split_on, gemm_typed, gemm_typed_on,
    layer_norm_reference, Epilogue, Fused, GemmOptions, Heads, LayerNorm, Parallel, Residual, SplitOut,
};
pub use isa::Isa;
pub use pack::{PackOptions, PackedWeights, WeightLayout};
pub use quant::{ActGranularity, ActType, WeightGranularity, MAX_K};

/// The crate version, e.g. "0.1.0".
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
