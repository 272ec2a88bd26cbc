//! Element types of activations and outputs: f32, f16 and bf16.
//!
//! Inputs are widened to f32 exactly before quantization, and outputs are computed in f32 by
//! the one epilogue and then rounded to the output type (round to nearest, ties to even), so
//! results stay identical across ISAs whatever the element types.

use half::{bf16, f16};

/// The element types of the C ABI (`dynq_dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// The C ABI value.
    pub fn to_raw(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
        }
    }
    /// From the C ABI value.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            2 => Some(DType::BF16),
            _ => None,
        }
    }
    /// Size in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// An activation or output element.
pub trait Element: Copy + Send + Sync + 'static + std::fmt::Display {
    const DTYPE: DType;
    /// Exact widening.
    fn to_f32(self) -> f32;
    /// Rounding to nearest, ties to even.
    fn from_f32(v: f32) -> Self;
    /// The values as f32 when they already are.
    fn as_f32(v: &[Self]) -> Option<&[f32]> {
        let _ = v;
        None
    }
    /// The buffer as f32 when it already is.
    fn as_f32_mut(y: &mut [Self]) -> Option<&mut [f32]> {
        let _ = y;
        None
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn as_f32(v: &[Self]) -> Option<&[f32]> {
        Some(v)
    }
    fn as_f32_mut(y: &mut [Self]) -> Option<&mut [f32]> {
        Some(y)
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rounding() {
        assert_eq!(f16::from_f32(1.0 + 1.0 / 2048.0).to_f32(), 1.0); // tie -> even
        assert_eq!(<bf16 as Element>::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        assert_eq!(<f16 as Element>::from_f32(70000.0).to_f32(), f32::INFINITY);
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(DType::from_raw(d.to_raw()), Some(d));
        }
        assert_eq!(DType::from_raw(3), None);
    }
}
