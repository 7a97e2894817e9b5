//! Element types: the dtypes kernels take (`f32`, `f16`, `bf16`) and the conversions the CPU
//! reference uses to read any of them (plus `f64`) exactly.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A kernel element type. Kernels are compiled once per dtype; entry points carry its suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE binary32.
    #[cfg_attr(feature = "cli", value(name = "f32", alias = "float32"))]
    F32,
    /// IEEE binary16.
    #[cfg_attr(feature = "cli", value(name = "f16", alias = "float16", alias = "half"))]
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    #[cfg_attr(feature = "cli", value(name = "bf16", alias = "bfloat16"))]
    BF16,
}

impl DType {
    /// Every dtype, in a fixed order.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Size of one element in bytes.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Lower-case name, also the suffix of kernel entry points (`_f32`, `_f16`, `_bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Unit roundoff `u` (half an ulp at 1.0) of the storage format, used to derive tolerances.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            DType::F32 => f64::powi(2.0, -24),
            DType::F16 => f64::powi(2.0, -11),
            DType::BF16 => f64::powi(2.0, -8),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = crate::MoleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(crate::MoleError::InvalidParameter {
                name: "dtype",
                value: s.to_string(),
                reason: "expected one of f32, f16, bf16",
            }),
        }
    }
}

/// A real number the CPU reference can read exactly as `f64` and write back rounded to nearest.
pub trait Scalar: Copy + Send + Sync + fmt::Debug + 'static {
    /// Exact widening conversion.
    fn to_f64(self) -> f64;
    /// Round-to-nearest-even narrowing conversion.
    fn from_f64(v: f64) -> Self;
}

/// A [`Scalar`] that kernels take as storage type.
pub trait KernelElement: Scalar + bytemuck::Pod {
    /// The matching [`DType`].
    const DTYPE: DType;
}

impl Scalar for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

impl Scalar for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Scalar for half::f16 {
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        half::f16::from_f64(v)
    }
}

impl Scalar for half::bf16 {
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        half::bf16::from_f64(v)
    }
}

impl KernelElement for f32 {
    const DTYPE: DType = DType::F32;
}
impl KernelElement for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl KernelElement for half::bf16 {
    const DTYPE: DType = DType::BF16;
}

/// Converts a slice of any [`Scalar`] to `f64`.
pub fn to_f64_vec<T: Scalar>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// Rounds a slice of `f64` to any [`Scalar`] (round to nearest even).
pub fn from_f64_vec<T: Scalar>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_parse_and_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>().unwrap(), d);
        }
        assert!("f64".parse::<DType>().is_err());
    }

    #[test]
    fn narrowing_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to even (1.0).
        assert_eq!(half::bf16::from_f64(1.0 + f64::powi(2.0, -8)).to_f64(), 1.0);
        // 1 + 3*2^-8 lies between 1 + 2^-7 and 1 + 2^-6: the even one is 1 + 2^-6.
        let v = half::bf16::from_f64(1.0 + 3.0 * f64::powi(2.0, -8)).to_f64();
        assert_eq!(v, 1.0 + f64::powi(2.0, -6));
        assert_eq!(half::f16::from_f64(1.0 + f64::powi(2.0, -11)).to_f64(), 1.0);
    }

    #[test]
    fn unit_roundoff_bounds_relative_error() {
        let u = DType::BF16.unit_roundoff();
        for i in 1..1000 {
            let v = 1.0 + i as f64 * 0.001_37;
            let r = half::bf16::from_f64(v).to_f64();
            assert!(((r - v) / v).abs() <= u, "{v} -> {r}");
        }
    }
}
