//! `model.safetensors` (spec §5.2): the header is parsed and checked by the `safetensors` crate;
//! tensors point into the memory-mapped file.

use super::{ByteSource, RawTensor, SourceDType};

/// The tensors of the safetensors file mapped at `buf`, in file (offset) order.
pub(crate) fn read(buf: &[u8]) -> Result<Vec<RawTensor>, String> {
    if buf.len() < 8 {
        return Err(format!(
            "truncated: {} bytes, shorter than the 8-byte safetensors header length",
            buf.len()
        ));
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&buf[..8]);
    let n = u64::from_le_bytes(n8);
    if n.saturating_add(8) > buf.len() as u64 {
        return Err(format!(
            "truncated or not a safetensors file: the header claims {n} bytes, the file has {}",
            buf.len()
        ));
    }
    let (header_len, meta) = match safetensors::SafeTensors::read_metadata(buf) {
        Ok(x) => x,
        Err(safetensors::SafeTensorError::MetadataIncompleteBuffer) => {
            return Err(incomplete(buf, n as usize));
        }
        Err(e) => return Err(format!("not a valid safetensors file: {e}")),
    };
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for key in meta.offset_keys() {
        let Some(info) = meta.info(&key) else {
            continue;
        };
        let (begin, end) = info.data_offsets;
        out.push(RawTensor {
            key,
            shape: info.shape.clone(),
            dtype: SourceDType::from_safetensors(info.dtype),
            bytes: ByteSource::Mapped {
                offset: data_start + begin,
                len: end - begin,
            },
        });
    }
    Ok(out)
}

/// The message for a file whose size does not match its header: says by how much.
fn incomplete(buf: &[u8], n: usize) -> String {
    let held = buf.len() - 8 - n;
    let described = std::str::from_utf8(&buf[8..8 + n])
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .and_then(|v| {
            v.as_object().map(|o| {
                o.values()
                    .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
                    .max()
                    .unwrap_or(0)
            })
        });
    match described {
        Some(d) if (d as usize) > held => format!(
            "truncated: the header describes {d} bytes of tensor data, the file holds {held}"
        ),
        Some(d) => format!(
            "the header describes {d} bytes of tensor data, but the file holds {held} (trailing bytes)"
        ),
        None => "the tensor data does not match the header".into(),
    }
}
