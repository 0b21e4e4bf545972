//! PyTorch >= 1.6 checkpoints (`pytorch_model.bin`, `SegVol_v1.pth`; spec §5.2): a zip archive
//! holding `<archive>/data.pkl` (the pickled dict) and one entry `<archive>/data/<key>` per
//! storage. PyTorch stores entries uncompressed and 64-byte aligned, so tensors point straight
//! into the memory-mapped file.
//!
//! The zip central directory is read here (a few dozen lines, zip64 included) instead of through
//! the `zip` crate, because what is needed is each entry's data offset within the mapped file.

use super::pickle::{self, TensorRef, Value};
use super::{ByteSource, RawTensor};
use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

/// One entry of the zip central directory.
#[derive(Clone, Debug)]
pub(crate) struct ZipEntry {
    pub name: String,
    /// 0 stored, 8 deflate.
    pub method: u16,
    pub compressed_size: u64,
    pub size: u64,
    /// Offset of the local header.
    pub header_offset: u64,
}

/// `n` bytes at `at`, or None when out of bounds (offsets come from the file: no overflow).
fn bytes_at(b: &[u8], at: usize, n: usize) -> Option<&[u8]> {
    b.get(at..at.checked_add(n)?)
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    bytes_at(b, at, 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    bytes_at(b, at, 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    bytes_at(b, at, 8).map(|s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;

/// Reads the central directory of the zip archive in `buf`.
pub(crate) fn read_directory(buf: &[u8]) -> Result<Vec<ZipEntry>, String> {
    const TRUNC: &str = "zip end-of-central-directory record not found (truncated file?)";
    // The end record is within the last 22 + 65535 bytes (the comment is at most 64 KiB).
    let min_start = buf.len().saturating_sub(22 + 0xffff);
    let eocd = (min_start..=buf.len().saturating_sub(22))
        .rev()
        .find(|&i| le32(buf, i) == Some(EOCD_SIG))
        .ok_or(TRUNC)?;
    let mut count = le16(buf, eocd + 10).ok_or(TRUNC)? as u64;
    let mut cd_size = le32(buf, eocd + 12).ok_or(TRUNC)? as u64;
    let mut cd_offset = le32(buf, eocd + 16).ok_or(TRUNC)? as u64;
    if count == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff {
        // zip64: the locator sits right before the end record.
        let loc = eocd
            .checked_sub(20)
            .filter(|&l| le32(buf, l) == Some(ZIP64_LOCATOR_SIG))
            .ok_or("zip64 end-of-central-directory locator not found")?;
        let z = usize::try_from(le64(buf, loc + 8).ok_or(TRUNC)?).map_err(|_| TRUNC)?;
        if le32(buf, z) != Some(ZIP64_EOCD_SIG) {
            return Err("zip64 end-of-central-directory record not found".into());
        }
        count = le64(buf, z + 32).ok_or(TRUNC)?;
        cd_size = le64(buf, z + 40).ok_or(TRUNC)?;
        cd_offset = le64(buf, z + 48).ok_or(TRUNC)?;
    }
    let cd_end = cd_offset
        .checked_add(cd_size)
        .filter(|&e| e <= buf.len() as u64)
        .ok_or("zip central directory lies outside the file (truncated file?)")?;
    let mut entries = Vec::new();
    let mut p = cd_offset as usize;
    for _ in 0..count {
        let bad = || format!("zip central directory entry at byte {p} is damaged");
        if le32(buf, p) != Some(CENTRAL_SIG) || p + 46 > cd_end as usize {
            return Err(bad());
        }
        let method = le16(buf, p + 10).ok_or_else(bad)?;
        let mut compressed_size = le32(buf, p + 20).ok_or_else(bad)? as u64;
        let mut size = le32(buf, p + 24).ok_or_else(bad)? as u64;
        let name_len = le16(buf, p + 28).ok_or_else(bad)? as usize;
        let extra_len = le16(buf, p + 30).ok_or_else(bad)? as usize;
        let comment_len = le16(buf, p + 32).ok_or_else(bad)? as usize;
        let mut header_offset = le32(buf, p + 42).ok_or_else(bad)? as u64;
        let name = buf.get(p + 46..p + 46 + name_len).ok_or_else(bad)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let extra = buf
            .get(p + 46 + name_len..p + 46 + name_len + extra_len)
            .ok_or_else(bad)?;
        // The zip64 extended-information field holds, in this order, whichever of the sizes
        // and the offset were saturated in the fixed fields.
        let mut e = 0;
        while e + 4 <= extra.len() {
            let id = le16(extra, e).ok_or_else(bad)?;
            let len = le16(extra, e + 2).ok_or_else(bad)? as usize;
            if id == 1 {
                let mut q = e + 4;
                let mut next = |v: &mut u64| -> Result<(), String> {
                    if *v == 0xffff_ffff {
                        *v = le64(extra, q).ok_or_else(bad)?;
                        q += 8;
                    }
                    Ok(())
                };
                next(&mut size)?;
                next(&mut compressed_size)?;
                next(&mut header_offset)?;
            }
            e += 4 + len;
        }
        entries.push(ZipEntry {
            name,
            method,
            compressed_size,
            size,
            header_offset,
        });
        p += 46 + name_len + extra_len + comment_len;
    }
    Ok(entries)
}

/// Where an entry's (possibly compressed) bytes are in `buf`.
fn entry_data(buf: &[u8], e: &ZipEntry) -> Result<std::ops::Range<usize>, String> {
    let bad = || {
        format!(
            "zip entry `{}` lies outside the file (truncated file?)",
            e.name
        )
    };
    let h = usize::try_from(e.header_offset).map_err(|_| bad())?;
    if le32(buf, h) != Some(LOCAL_SIG) {
        return Err(bad());
    }
    let name_len = le16(buf, h + 26).ok_or_else(bad)? as usize;
    let extra_len = le16(buf, h + 28).ok_or_else(bad)? as usize;
    let start = h + 30 + name_len + extra_len;
    let len = usize::try_from(e.compressed_size).map_err(|_| bad())?;
    let end = start.checked_add(len).ok_or_else(bad)?;
    if end > buf.len() {
        return Err(bad());
    }
    Ok(start..end)
}

/// An entry's bytes: borrowed when stored, inflated when deflated.
enum EntryBytes<'a> {
    Stored(&'a [u8]),
    Inflated(Arc<Vec<u8>>),
}

/// The largest `data.pkl` accepted, inflated (the released checkpoints' are under 1 MiB).
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// Deflate cannot expand data by more than about 1032:1; an entry that declares more is damaged
/// (or a bomb) and is refused before anything is inflated.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// An entry's bytes, at most `max` of them: the declared size is checked against `max` and the
/// deflate ratio before inflating, and inflation stops one byte past the declared size.
fn read_entry<'a>(buf: &'a [u8], e: &ZipEntry, max: u64) -> Result<EntryBytes<'a>, String> {
    if e.size > max {
        return Err(format!(
            "zip entry `{}` declares {} bytes, more than {max} (limit)",
            e.name, e.size
        ));
    }
    let range = entry_data(buf, e)?;
    match e.method {
        0 => {
            if e.size != e.compressed_size {
                return Err(format!("zip entry `{}`: stored sizes disagree", e.name));
            }
            Ok(EntryBytes::Stored(&buf[range]))
        }
        8 => {
            if e.size > (range.len() as u64).saturating_mul(MAX_DEFLATE_RATIO) + 1024 {
                return Err(format!(
                    "zip entry `{}` declares {} bytes from {} compressed (damaged or a zip bomb)",
                    e.name,
                    e.size,
                    range.len()
                ));
            }
            let cap = usize::try_from(e.size).unwrap_or(0).min(1 << 24);
            let mut out = Vec::with_capacity(cap);
            flate2::read::DeflateDecoder::new(&buf[range])
                .take(e.size.saturating_add(1))
                .read_to_end(&mut out)
                .map_err(|err| format!("zip entry `{}`: cannot inflate: {err}", e.name))?;
            if out.len() as u64 != e.size {
                return Err(format!("zip entry `{}`: inflated size is wrong", e.name));
            }
            Ok(EntryBytes::Inflated(Arc::new(out)))
        }
        m => Err(format!(
            "zip entry `{}` uses compression method {m}; only stored (0) and deflate (8) are read",
            e.name
        )),
    }
}

/// The magic number that starts a pre-1.6 (non-zip) `torch.save` file, after `\x80\x02\x8a\x0a`.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// The tensors of a PyTorch checkpoint, in file order, plus what was left aside.
pub(crate) struct TorchCheckpoint {
    pub tensors: Vec<RawTensor>,
    /// `Some("model")` when the tensors came from a training checkpoint's entry.
    pub entry: Option<String>,
    /// Top-level entries that were not read (optimizer state, epoch, ...), and state-dict entries
    /// that are not tensors.
    pub ignored: Vec<String>,
}

/// Reads a PyTorch zip checkpoint from the mapped file `buf`.
pub(crate) fn read_checkpoint(buf: &[u8]) -> Result<TorchCheckpoint, String> {
    if buf.len() >= 14 && buf[..4] == [0x80, 0x02, 0x8a, 0x0a] && buf[4..14] == LEGACY_MAGIC {
        return Err(
            "this is the legacy (pre-1.6) torch.save format; re-save it with torch >= 1.6 \
                    (the default zip format)"
                .into(),
        );
    }
    if !buf.starts_with(b"PK") {
        return Err("not a PyTorch zip checkpoint (no zip signature at the start)".into());
    }
    let entries = read_directory(buf)?;
    let by_name: HashMap<&str, &ZipEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let pkl = entries
        .iter()
        .filter(|e| e.name == "data.pkl" || e.name.ends_with("/data.pkl"))
        .min_by_key(|e| e.name.len())
        .ok_or("zip archive has no data.pkl: not a torch.save checkpoint")?;
    let prefix = &pkl.name[..pkl.name.len() - "data.pkl".len()];
    if let Some(bo) = by_name.get(format!("{prefix}byteorder").as_str()) {
        let order = match read_entry(buf, bo, 64)? {
            EntryBytes::Stored(b) => b.to_vec(),
            EntryBytes::Inflated(b) => b.to_vec(),
        };
        if order != b"little" {
            return Err(format!(
                "checkpoint byte order is {:?}; only little-endian checkpoints are read",
                String::from_utf8_lossy(&order)
            ));
        }
    }
    let pickled = read_entry(buf, pkl, MAX_PICKLE_BYTES).map_err(|m| format!("pickle {m}"))?;
    let pickled: &[u8] = match &pickled {
        EntryBytes::Stored(b) => b,
        EntryBytes::Inflated(b) => b,
    };
    let top = pickle::load(pickled).map_err(|e| format!("{}: {e}", pkl.name))?;
    let Value::Dict(top_dict) = top else {
        return Err(format!(
            "the checkpoint holds {}, expected a dict of tensors",
            top.kind()
        ));
    };
    let top = &top_dict.borrow().items;
    // A training checkpoint ({'model': state_dict, 'optimizer': ..., 'epoch': ...}) or a flat
    // state dict.
    let nested = top.iter().find_map(|(k, v)| match (k, v) {
        (Value::Str(k), Value::Dict(d)) if &**k == "model" || &**k == "state_dict" => {
            Some((k.to_string(), d.clone()))
        }
        _ => None,
    });
    let mut ignored = Vec::new();
    let (entry, state) = match nested {
        Some((name, d)) => {
            for (k, _) in top.iter() {
                match k {
                    Value::Str(s) if **s == *name => {}
                    Value::Str(s) => ignored.push(s.to_string()),
                    other => ignored.push(format!("<{}>", other.kind())),
                }
            }
            (Some(name), d)
        }
        None => (None, top_dict.clone()),
    };
    let state = &state.borrow().items;
    let mut inflated: HashMap<String, Arc<Vec<u8>>> = HashMap::new();
    let mut tensors = Vec::with_capacity(state.len());
    for (k, v) in state.iter() {
        let Value::Str(key) = k else {
            return Err(format!("state dict key is {}, expected a str", k.kind()));
        };
        let Value::Tensor(t) = v else {
            ignored.push(format!("{key} ({})", v.kind()));
            continue;
        };
        tensors.push(locate(buf, &by_name, prefix, key, t, &mut inflated)?);
    }
    Ok(TorchCheckpoint {
        tensors,
        entry,
        ignored,
    })
}

/// Finds the bytes of tensor `key` in its storage entry `<prefix>data/<storage key>`.
fn locate(
    buf: &[u8],
    by_name: &HashMap<&str, &ZipEntry>,
    prefix: &str,
    key: &str,
    t: &TensorRef,
    inflated: &mut HashMap<String, Arc<Vec<u8>>>,
) -> Result<RawTensor, String> {
    let dtype = t.storage.dtype.clone();
    let shape = t.shape.clone();
    let Some(esize) = dtype.size() else {
        // Unknown element type: the schema check reports it by name.
        return Ok(RawTensor {
            key: key.to_string(),
            shape,
            dtype,
            bytes: ByteSource::None,
        });
    };
    if !t.is_contiguous() {
        return Err(format!(
            "tensor `{key}` is not contiguous (shape {:?}, stride {:?}); save it after .contiguous()",
            t.shape, t.stride
        ));
    }
    let name = format!("{prefix}data/{}", t.storage.key);
    let entry = by_name.get(name.as_str()).ok_or_else(|| {
        format!("tensor `{key}`: storage entry `{name}` is missing from the archive")
    })?;
    let overflow = || format!("tensor `{key}`: shape {:?} overflows", t.shape);
    let numel = t.numel().ok_or_else(overflow)?;
    let len = numel.checked_mul(esize).ok_or_else(overflow)?;
    let start = t.offset.checked_mul(esize).ok_or_else(overflow)?;
    let end = start.checked_add(len).ok_or_else(overflow)?;
    let declared = t.storage.numel.saturating_mul(esize);
    if end > declared {
        return Err(format!(
            "tensor `{key}`: offset {} + {} elements exceeds its storage of {} elements",
            t.offset, numel, t.storage.numel
        ));
    }
    if (entry.size as u128) < declared as u128 {
        return Err(format!(
            "storage `{name}` holds {} bytes, the pickle declares {declared} (truncated file?)",
            entry.size
        ));
    }
    let bytes = if entry.method == 0 {
        if entry.size != entry.compressed_size {
            return Err(format!("zip entry `{name}`: stored sizes disagree"));
        }
        let range = entry_data(buf, entry)?;
        ByteSource::Mapped {
            offset: range.start + start,
            len,
        }
    } else {
        let data = match inflated.get(&name) {
            Some(d) => d.clone(),
            None => {
                let EntryBytes::Inflated(d) = read_entry(buf, entry, u64::MAX)? else {
                    return Err(format!("zip entry `{name}`: inconsistent compression"));
                };
                inflated.insert(name.clone(), d.clone());
                d
            }
        };
        ByteSource::Owned {
            data,
            offset: start,
            len,
        }
    };
    Ok(RawTensor {
        key: key.to_string(),
        shape,
        dtype,
        bytes,
    })
}
