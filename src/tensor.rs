//! Host tensors and safetensors files for inputs, outputs and fixtures (`segvol window`).
//! Checkpoints are loaded by [`crate::weights`], memory-mapped; this module is for the small
//! files a user passes around.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// An f32 tensor on the host, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor from its shape and data; panics if they disagree (a programming error).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "HostTensor::new: shape {shape:?} does not match {} values",
            data.len()
        );
        HostTensor { shape, data }
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        HostTensor {
            shape,
            data: vec![0.0; n],
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Largest absolute value (0 for an empty tensor).
    pub fn max_abs(&self) -> f32 {
        self.data.iter().fold(0.0f32, |m, &x| m.max(x.abs()))
    }

    /// `max|a - b| / max|b|`, the fixtures' relative error measure (fixtures README §6).
    pub fn rel_err(&self, reference: &HostTensor) -> f32 {
        assert_eq!(self.shape, reference.shape, "rel_err: shapes differ");
        let num = self
            .data
            .iter()
            .zip(&reference.data)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let den = reference.max_abs();
        if den == 0.0 {
            num
        } else {
            num / den
        }
    }
}

/// Reads every tensor of a safetensors file, converting F32, F16, BF16, F64, I64 and I32 to f32
/// (I64 token ids are exact in f32 below 2^24).
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        use safetensors::Dtype as D;
        let values: Vec<f32> = match view.dtype() {
            D::F32 => crate::dtype::decode_f32(data, crate::dtype::DType::F32),
            D::F16 => crate::dtype::decode_f32(data, crate::dtype::DType::F16),
            D::BF16 => crate::dtype::decode_f32(data, crate::dtype::DType::BF16),
            D::F64 => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            D::I64 => data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            D::I32 => data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            other => {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` has unsupported dtype {other:?}"),
                ))
            }
        };
        out.insert(name, HostTensor::new(shape, values));
    }
    Ok(out)
}

/// Reads one named tensor of a safetensors file.
pub fn read_tensor(path: &Path, name: &str) -> Result<HostTensor> {
    let mut all = read_safetensors(path)?;
    all.remove(name).ok_or_else(|| {
        Error::format(
            path,
            format!(
                "no tensor named `{name}` (found: {})",
                all.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    })
}

/// Writes f32 tensors to a safetensors file, through a temporary file and a rename so a
/// failure never leaves a partial output.
pub fn write_safetensors(path: &Path, tensors: &[(&str, &HostTensor)]) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, t)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                t.shape.clone(),
                bytemuck::cast_slice(&t.data),
            )
            .map_err(|e| Error::Internal(format!("tensor `{name}`: {e}")))?;
            Ok((name.to_string(), view))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::Internal(format!("serialising {}: {e}", path.display())))?;
    crate::io::write_atomic(path, &bytes)
}
