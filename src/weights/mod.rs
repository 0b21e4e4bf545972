//! Checkpoints as downloaded (spec §5.2): Hugging Face `model.safetensors` and
//! `pytorch_model.bin`, GitHub `SegVol_v1.pth`, read without Python, memory-mapped, normalised
//! (`model.` / `module.` stripped, `position_ids` skipped) and validated against the schema of
//! the configuration (spec §5.1) before anything runs. Also the `segvol-random-v1` test weights
//! (random-weights.md).
//!
//! A [`WeightStore`] is host-side and read-only: f32 tensors addressed by unprefixed key. F32 data
//! that is 4-byte aligned in the file is used in place (zero-copy); anything else (F16, BF16,
//! F64, misaligned or compressed data) is converted once into owned f32.

pub mod pickle;
pub mod random;
mod safetensors_file;
pub mod schema;
mod torch;

pub use random::{generate_f32, generate_tensor, write_model_dir, TensorData};
pub use schema::{schema, SpecDType, TensorSpec, PARTS, POSITION_IDS_KEY};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A SIGBUS handler that names the memory-mapped checkpoints. Reading a mapped page past the
/// end of a file that was truncated after it was opened raises SIGBUS, which would otherwise
/// kill the process with no message. The handler writes one prepared line with write(2) and
/// leaves with `_exit(1)` (both async-signal-safe); nothing is allocated in the handler.
mod sigbus {
    use std::path::Path;
    use std::sync::atomic::{AtomicPtr, Ordering};
    use std::sync::{Mutex, Once};

    /// The message, replaced (and the old one leaked: the handler may be reading it) whenever
    /// another file is mapped. A few bytes per opened checkpoint.
    static MESSAGE: AtomicPtr<&'static [u8]> = AtomicPtr::new(std::ptr::null_mut());
    static PATHS: Mutex<Vec<String>> = Mutex::new(Vec::new());
    static INSTALL: Once = Once::new();

    /// At most this many file names in the message (the latest ones).
    const MAX_NAMED: usize = 4;

    extern "C" fn on_sigbus(_sig: libc::c_int) {
        let msg = MESSAGE.load(Ordering::Acquire);
        if !msg.is_null() {
            // SAFETY: `msg` points to a leaked, never-freed slice; write(2) and _exit(2) are
            // async-signal-safe.
            unsafe {
                let m: &[u8] = *msg;
                libc::write(2, m.as_ptr().cast(), m.len());
            }
        }
        unsafe { libc::_exit(1) }
    }

    /// Adds `path` to the files the SIGBUS message names and installs the handler once.
    pub(super) fn watch(path: &Path) {
        let name = path.display().to_string();
        let Ok(mut paths) = PATHS.lock() else { return };
        paths.retain(|p| *p != name);
        paths.push(name);
        if paths.len() > MAX_NAMED {
            paths.remove(0);
        }
        let msg = format!(
            "segvol: bus error (SIGBUS) reading the memory-mapped checkpoint {}: the file was truncated or replaced while segvol was using it\n",
            paths.join(", ")
        );
        let leaked: &'static [u8] = Box::leak(msg.into_bytes().into_boxed_slice());
        MESSAGE.store(Box::into_raw(Box::new(leaked)), Ordering::Release);
        INSTALL.call_once(|| {
            // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
            }
        });
    }
}

/// Element type of a tensor as stored in the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceDType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    /// A type this reader does not convert (named as the file names it).
    Other(String),
}

impl SourceDType {
    /// From a `torch.XStorage` class name.
    pub fn from_torch_storage(class: &str) -> SourceDType {
        match class {
            "FloatStorage" => SourceDType::F32,
            "DoubleStorage" => SourceDType::F64,
            "HalfStorage" => SourceDType::F16,
            "BFloat16Storage" => SourceDType::BF16,
            "LongStorage" => SourceDType::I64,
            "IntStorage" => SourceDType::I32,
            "ShortStorage" => SourceDType::I16,
            "CharStorage" => SourceDType::I8,
            "ByteStorage" => SourceDType::U8,
            "BoolStorage" => SourceDType::Bool,
            other => SourceDType::Other(other.to_string()),
        }
    }

    fn from_safetensors(d: safetensors::Dtype) -> SourceDType {
        use safetensors::Dtype as D;
        match d {
            D::F32 => SourceDType::F32,
            D::F64 => SourceDType::F64,
            D::F16 => SourceDType::F16,
            D::BF16 => SourceDType::BF16,
            D::I64 => SourceDType::I64,
            D::I32 => SourceDType::I32,
            D::I16 => SourceDType::I16,
            D::I8 => SourceDType::I8,
            D::U8 => SourceDType::U8,
            D::BOOL => SourceDType::Bool,
            other => SourceDType::Other(format!("{other:?}")),
        }
    }

    /// Bytes per element, where known.
    pub fn size(&self) -> Option<usize> {
        Some(match self {
            SourceDType::F64 | SourceDType::I64 => 8,
            SourceDType::F32 | SourceDType::I32 => 4,
            SourceDType::F16 | SourceDType::BF16 | SourceDType::I16 => 2,
            SourceDType::I8 | SourceDType::U8 | SourceDType::Bool => 1,
            SourceDType::Other(_) => return None,
        })
    }

    /// Whether the loader converts it to f32 (the float types).
    pub fn is_float(&self) -> bool {
        matches!(
            self,
            SourceDType::F32 | SourceDType::F64 | SourceDType::F16 | SourceDType::BF16
        )
    }
}

impl fmt::Display for SourceDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            SourceDType::F32 => "F32",
            SourceDType::F64 => "F64",
            SourceDType::F16 => "F16",
            SourceDType::BF16 => "BF16",
            SourceDType::I64 => "I64",
            SourceDType::I32 => "I32",
            SourceDType::I16 => "I16",
            SourceDType::I8 => "I8",
            SourceDType::U8 => "U8",
            SourceDType::Bool => "BOOL",
            SourceDType::Other(name) => name,
        };
        f.write_str(s)
    }
}

/// Where a raw tensor's bytes are.
pub(crate) enum ByteSource {
    /// A byte range of the mapped file.
    Mapped { offset: usize, len: usize },
    /// A byte range of an inflated zip entry.
    Owned {
        data: Arc<Vec<u8>>,
        offset: usize,
        len: usize,
    },
    /// Unknown element type: no bytes located.
    None,
}

/// A tensor as a container lists it, before normalisation and validation.
pub(crate) struct RawTensor {
    /// The key as written in the file (with any `model.` / `module.` prefix).
    pub key: String,
    pub shape: Vec<usize>,
    pub dtype: SourceDType,
    pub bytes: ByteSource,
}

/// The container a store was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    Safetensors,
    /// PyTorch zip + pickle. `entry` is `Some("model")` for a training checkpoint whose
    /// `model` entry holds the state dict (GitHub `SegVol_v1.pth`), `None` for a flat state dict
    /// (`pytorch_model.bin`).
    PyTorch {
        entry: Option<String>,
    },
    /// Generated in memory by `segvol-random-v1`.
    Generated {
        seed: u64,
    },
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightFormat::Safetensors => f.write_str("safetensors"),
            WeightFormat::PyTorch { entry: None } => f.write_str("PyTorch zip (state dict)"),
            WeightFormat::PyTorch { entry: Some(e) } => {
                write!(f, "PyTorch zip (training checkpoint, entry `{e}`)")
            }
            WeightFormat::Generated { seed } => {
                write!(f, "generated ({}, seed {seed})", random::GENERATOR)
            }
        }
    }
}

enum Data {
    /// `len` f32 values at byte `offset` of the mapped file (4-byte aligned).
    Mapped {
        offset: usize,
        len: usize,
    },
    Owned(Vec<f32>),
}

struct Entry {
    key: String,
    shape: Vec<usize>,
    source: SourceDType,
    data: Data,
}

/// A validated, host-side, read-only set of f32 tensors addressed by unprefixed key, in schema
/// order. Holds every F32 tensor of [`schema()`] for its configuration (not `position_ids`).
pub struct WeightStore {
    path: PathBuf,
    format: WeightFormat,
    config: ModelConfig,
    map: Option<Mmap>,
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
    skipped: Vec<String>,
    ignored: Vec<String>,
}

impl fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightStore")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("tensors", &self.entries.len())
            .field("values", &self.total_values())
            .finish()
    }
}

/// The prefixes the released files put before the module keys: `model.` (Hugging Face export,
/// `SegVolModel.model`) and `module.` (DataParallel, `SegVol_v1.pth`).
const PREFIXES: [&str; 2] = ["model.", "module."];

/// Strips the file prefixes. No SegVol key starts with either, so stripping repeatedly is safe.
pub fn normalize_key(key: &str) -> &str {
    let mut k = key;
    while let Some(rest) = PREFIXES.iter().find_map(|p| k.strip_prefix(p)) {
        k = rest;
    }
    k
}

/// How many schema problems an error message lists.
const MAX_LISTED: usize = 10;

/// One disagreement between a checkpoint and the schema.
enum Problem {
    Missing {
        key: String,
        expected: Vec<usize>,
    },
    Unexpected {
        key: String,
        shape: Vec<usize>,
    },
    Shape {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    DType {
        key: String,
        dtype: SourceDType,
    },
    Duplicate {
        key: String,
        first: String,
        second: String,
    },
}

impl Problem {
    fn describe(&self) -> String {
        match self {
            Problem::Missing { key, expected } => {
                format!("missing tensor `{key}` (expected shape {expected:?})")
            }
            Problem::Unexpected { key, shape } => {
                format!("unexpected tensor `{key}` with shape {shape:?}")
            }
            Problem::Shape {
                key,
                expected,
                found,
            } => format!("tensor `{key}` has shape {found:?}, expected {expected:?}"),
            Problem::DType { key, dtype } => format!(
                "tensor `{key}` has dtype {dtype}; the model needs a floating-point type (F32, F16, BF16 or F64)"
            ),
            Problem::Duplicate { key, first, second } => {
                format!("tensor `{key}` appears twice (as `{first}` and `{second}`)")
            }
        }
    }

    fn into_error(self, path: &Path) -> Error {
        let path = path.to_path_buf();
        match self {
            Problem::Missing { key, expected } => Error::MissingTensor {
                path,
                key,
                expected,
            },
            Problem::Unexpected { key, shape } => Error::UnexpectedTensor { path, key, shape },
            Problem::Shape {
                key,
                expected,
                found,
            } => Error::TensorShape {
                path,
                key,
                expected,
                found,
            },
            other => Error::Format {
                path,
                msg: other.describe(),
            },
        }
    }
}

/// A one-line description of the shapes a configuration fixes, for messages.
pub fn describe_config(cfg: &ModelConfig) -> String {
    let s = cfg.spatial_size;
    format!(
        "window {}x{}x{}, ViT {}x{} layers, decoder dim {}, CLIP text {}x{} layers",
        s[0],
        s[1],
        s[2],
        cfg.encoder.hidden,
        cfg.encoder.layers,
        cfg.decoder.dim,
        cfg.text.hidden,
        cfg.text.layers
    )
}

/// Decodes little-endian `bytes` of a float `dtype` into f32.
fn decode(bytes: &[u8], dtype: &SourceDType) -> Vec<f32> {
    use crate::dtype::{decode_f32, DType};
    match dtype {
        SourceDType::F32 => decode_f32(bytes, DType::F32),
        SourceDType::F16 => decode_f32(bytes, DType::F16),
        SourceDType::BF16 => decode_f32(bytes, DType::BF16),
        SourceDType::F64 => bytes
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
        _ => unreachable!("validation admits float types only"),
    }
}

impl WeightStore {
    /// Opens a checkpoint file and validates it against `schema(cfg)`: `.safetensors`
    /// (memory-mapped), PyTorch zip (`pytorch_model.bin`, `*.pth`; a top-level `model` entry is
    /// used when present, as in `SegVol_v1.pth`). Other extensions are recognised by content.
    pub fn open(path: &Path, cfg: &ModelConfig) -> Result<WeightStore> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Err(Error::format(
                path,
                "is a directory; give a checkpoint file (or open it as a model directory)",
            ));
        }
        if meta.len() == 0 {
            return Err(Error::format(path, "the file is empty"));
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and private to this store; like every memory-mapped
        // loader, it assumes the checkpoint is not modified while it is open.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        // If the file shrinks while mapped, reading it raises SIGBUS: say which file, not just
        // "Bus error".
        sigbus::watch(path);
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let torch_like = match ext.as_deref() {
            Some("safetensors") => false,
            Some("bin" | "pth" | "pt" | "ckpt") => true,
            // Sniff: a zip, or a pickle (the legacy format is refused with a message).
            _ => map.starts_with(b"PK") || map.starts_with(&[0x80]),
        };
        let (format, raws, ignored) = if torch_like {
            let ck = torch::read_checkpoint(&map).map_err(|m| Error::format(path, m))?;
            (
                WeightFormat::PyTorch { entry: ck.entry },
                ck.tensors,
                ck.ignored,
            )
        } else {
            let raws = safetensors_file::read(&map).map_err(|m| Error::format(path, m))?;
            (WeightFormat::Safetensors, raws, Vec::new())
        };
        Self::from_raw(path, cfg, format, map, raws, ignored)
    }

    /// Normalises keys, validates against the schema and materialises the entries.
    fn from_raw(
        path: &Path,
        cfg: &ModelConfig,
        format: WeightFormat,
        map: Mmap,
        raws: Vec<RawTensor>,
        ignored: Vec<String>,
    ) -> Result<WeightStore> {
        let mut problems = Vec::new();
        let mut skipped = Vec::new();
        let mut by_key: HashMap<&str, &RawTensor> = HashMap::new();
        for raw in &raws {
            let key = normalize_key(&raw.key);
            if key.ends_with("position_ids") {
                skipped.push(raw.key.clone());
                continue;
            }
            if let Some(prev) = by_key.insert(key, raw) {
                problems.push(Problem::Duplicate {
                    key: key.to_string(),
                    first: prev.key.clone(),
                    second: raw.key.clone(),
                });
            }
        }
        let specs: Vec<TensorSpec> = schema(cfg)
            .into_iter()
            .filter(|s| s.dtype == SpecDType::F32)
            .collect();
        let mut chosen = Vec::with_capacity(specs.len());
        for spec in &specs {
            match by_key.get(spec.key.as_str()) {
                None => problems.push(Problem::Missing {
                    key: spec.key.clone(),
                    expected: spec.shape.clone(),
                }),
                Some(raw) if raw.shape != spec.shape => problems.push(Problem::Shape {
                    key: raw.key.clone(),
                    expected: spec.shape.clone(),
                    found: raw.shape.clone(),
                }),
                Some(raw) if !raw.dtype.is_float() => problems.push(Problem::DType {
                    key: raw.key.clone(),
                    dtype: raw.dtype.clone(),
                }),
                Some(raw) => chosen.push((spec, *raw)),
            }
        }
        let known: std::collections::HashSet<&str> = specs.iter().map(|s| s.key.as_str()).collect();
        for raw in &raws {
            let key = normalize_key(&raw.key);
            if !key.ends_with("position_ids") && !known.contains(key) {
                problems.push(Problem::Unexpected {
                    key: raw.key.clone(),
                    shape: raw.shape.clone(),
                });
            }
        }
        if problems.len() == 1 {
            return Err(problems.pop().expect("one problem").into_error(path));
        }
        if !problems.is_empty() {
            let n = problems.len();
            let mut msg = format!(
                "{n} problems against the model schema ({}):",
                describe_config(cfg)
            );
            for p in problems.iter().take(MAX_LISTED) {
                msg.push_str("\n  - ");
                msg.push_str(&p.describe());
            }
            if n > MAX_LISTED {
                msg.push_str(&format!("\n  ... and {} more", n - MAX_LISTED));
            }
            return Err(Error::format(path, msg));
        }

        // Materialise: point into the map where possible, convert otherwise (in parallel).
        let entries: Vec<Entry> = chosen
            .par_iter()
            .map(|(spec, raw)| {
                let numel = spec.numel();
                let esize = raw.dtype.size().expect("float types have a size");
                let bytes: &[u8] = match &raw.bytes {
                    ByteSource::Mapped { offset, len } => map.get(*offset..offset + len),
                    ByteSource::Owned { data, offset, len } => data.get(*offset..offset + len),
                    ByteSource::None => None,
                }
                .filter(|b| b.len() == numel * esize)
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!("tensor `{}`: its data lies outside the file", raw.key),
                    )
                })?;
                let aligned = (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>());
                let data = match (&raw.dtype, &raw.bytes) {
                    (SourceDType::F32, ByteSource::Mapped { offset, .. })
                        if aligned && cfg!(target_endian = "little") =>
                    {
                        Data::Mapped {
                            offset: *offset,
                            len: numel,
                        }
                    }
                    _ => Data::Owned(decode(bytes, &raw.dtype)),
                };
                Ok(Entry {
                    key: spec.key.clone(),
                    shape: spec.shape.clone(),
                    source: raw.dtype.clone(),
                    data,
                })
            })
            .collect::<Result<_>>()?;
        drop(chosen);
        // Non-finite weights give NaN logits and an empty mask that looks like success: refuse
        // them here, naming every such tensor (up to a few), its count and its first bad
        // element. Huge finite values (1e38) are left to the finite-logits check of every model
        // call, which sees whether they overflow.
        let nonfinite: Vec<(String, usize, usize, f32)> = entries
            .par_iter()
            .filter_map(|e| {
                let v: &[f32] = match &e.data {
                    Data::Owned(v) => v,
                    Data::Mapped { offset, len } => {
                        bytemuck::cast_slice(&map[*offset..offset + len * 4])
                    }
                };
                let first = v.iter().position(|x| !x.is_finite())?;
                let count = v[first..].iter().filter(|x| !x.is_finite()).count();
                Some((e.key.clone(), count, first, v[first]))
            })
            .collect();
        if !nonfinite.is_empty() {
            const SHOWN: usize = 4;
            let mut list: Vec<String> = nonfinite
                .iter()
                .take(SHOWN)
                .map(|(key, n, i, v)| {
                    format!("`{key}` ({n} value(s), the first {v} at element {i})")
                })
                .collect();
            if nonfinite.len() > SHOWN {
                list.push(format!("and {} more tensors", nonfinite.len() - SHOWN));
            }
            return Err(Error::format(
                path,
                format!(
                    "{} tensor(s) hold non-finite values: {}",
                    nonfinite.len(),
                    list.join(", ")
                ),
            ));
        }
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.key.clone(), i))
            .collect();
        Ok(WeightStore {
            path: path.to_path_buf(),
            format,
            config: cfg.clone(),
            map: Some(map),
            entries,
            index,
            skipped,
            ignored,
        })
    }

    /// The `segvol-random-v1` weights of `cfg` for `seed`, generated in memory (the same values
    /// `write_model_dir` writes). Its path reads `<segvol-random-v1 seed N>`.
    pub fn random(cfg: &ModelConfig, seed: u64) -> WeightStore {
        let entries: Vec<Entry> = schema(cfg)
            .into_iter()
            .filter(|s| s.dtype == SpecDType::F32)
            .map(|s| Entry {
                data: Data::Owned(generate_f32(&s.key, &s.shape, seed)),
                key: s.key,
                shape: s.shape,
                source: SourceDType::F32,
            })
            .collect();
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.key.clone(), i))
            .collect();
        WeightStore {
            path: PathBuf::from(format!("<{} seed {seed}>", random::GENERATOR)),
            format: WeightFormat::Generated { seed },
            config: cfg.clone(),
            map: None,
            entries,
            index,
            skipped: Vec::new(),
            ignored: Vec::new(),
        }
    }

    fn data<'a>(&'a self, e: &'a Entry) -> &'a [f32] {
        match &e.data {
            Data::Owned(v) => v,
            Data::Mapped { offset, len } => {
                let map = self.map.as_ref().expect("mapped entries have a map");
                // In bounds and aligned: checked when the store was built.
                bytemuck::cast_slice(&map[*offset..offset + len * 4])
            }
        }
    }

    /// The values of tensor `key` (unprefixed), row-major.
    pub fn get(&self, key: &str) -> Option<&[f32]> {
        self.index.get(key).map(|&i| self.data(&self.entries[i]))
    }

    /// The shape of tensor `key`.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.index
            .get(key)
            .map(|&i| self.entries[i].shape.as_slice())
    }

    /// Shape and values of tensor `key`; a missing key is an engine bug here (the store was
    /// validated against the schema), reported as `Error::Internal` naming the key.
    pub fn require(&self, key: &str) -> Result<(&[usize], &[f32])> {
        match self.index.get(key) {
            Some(&i) => Ok((&self.entries[i].shape, self.data(&self.entries[i]))),
            None => Err(Error::Internal(format!(
                "weights {}: no tensor `{key}` in the schema",
                self.path.display()
            ))),
        }
    }

    /// The element type tensor `key` had in the file.
    pub fn source_dtype(&self, key: &str) -> Option<&SourceDType> {
        self.index.get(key).map(|&i| &self.entries[i].source)
    }

    /// Whether tensor `key` is used in place from the mapped file (zero-copy).
    pub fn is_mapped(&self, key: &str) -> bool {
        self.index
            .get(key)
            .is_some_and(|&i| matches!(self.entries[i].data, Data::Mapped { .. }))
    }

    /// `(key, shape, values)` in schema order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[usize], &[f32])> + '_ {
        self.entries
            .iter()
            .map(move |e| (e.key.as_str(), e.shape.as_slice(), self.data(e)))
    }

    /// Number of tensors held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store holds no tensor (never, for a validated store).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The container the weights came from.
    pub fn format(&self) -> &WeightFormat {
        &self.format
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configuration the store was validated against.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Number of f32 values held (the schema's total less the skipped `position_ids`).
    pub fn total_values(&self) -> usize {
        self.entries.iter().map(|e| shape_numel(&e.shape)).sum()
    }

    /// Per-part statistics and the validation result (`segvol inspect`).
    pub fn summary(&self) -> WeightSummary {
        let mut parts: Vec<PartSummary> = PARTS
            .iter()
            .map(|p| PartSummary {
                name: p.to_string(),
                tensors: 0,
                values: 0,
                bytes: 0,
                dtypes: Vec::new(),
            })
            .collect();
        let mut mapped = 0;
        for e in &self.entries {
            let part = schema::part_of(&e.key);
            let Some(ps) = parts.iter_mut().find(|p| p.name == part) else {
                continue;
            };
            let n = shape_numel(&e.shape);
            ps.tensors += 1;
            ps.values += n;
            ps.bytes += n * e.source.size().unwrap_or(4);
            if !ps.dtypes.contains(&e.source) {
                ps.dtypes.push(e.source.clone());
                ps.dtypes.sort();
            }
            mapped += matches!(e.data, Data::Mapped { .. }) as usize;
        }
        let validation = format!(
            "ok: all {} floating-point tensors of the schema are present with the expected shapes ({})",
            self.entries.len(),
            describe_config(&self.config)
        );
        WeightSummary {
            path: self.path.clone(),
            format: self.format.clone(),
            tensors: self.entries.len(),
            values: parts.iter().map(|p| p.values).sum(),
            bytes: parts.iter().map(|p| p.bytes).sum(),
            parts,
            mapped,
            skipped: self.skipped.clone(),
            ignored: self.ignored.clone(),
            validation,
        }
    }
}

fn shape_numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// One part of the model in a [`WeightSummary`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartSummary {
    /// One of [`PARTS`].
    pub name: String,
    pub tensors: usize,
    pub values: usize,
    /// Bytes in the checkpoint (source dtype).
    pub bytes: usize,
    /// The source element types seen.
    pub dtypes: Vec<SourceDType>,
}

/// What `segvol inspect` prints about a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightSummary {
    pub path: PathBuf,
    pub format: WeightFormat,
    pub parts: Vec<PartSummary>,
    pub tensors: usize,
    pub values: usize,
    pub bytes: usize,
    /// Tensors used in place from the mapped file.
    pub mapped: usize,
    /// Keys present in the file and skipped on purpose (`position_ids`).
    pub skipped: Vec<String>,
    /// Entries not read: a training checkpoint's other top-level entries, non-tensor values.
    pub ignored: Vec<String>,
    pub validation: String,
}

/// `1234567` -> `1,234,567`.
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for WeightSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "weights     {}", self.path.display())?;
        writeln!(
            f,
            "format      {} ({} tensors used in place, {} converted or copied)",
            self.format,
            self.mapped,
            self.tensors - self.mapped
        )?;
        writeln!(
            f,
            "{:<30} {:>8} {:>14} {:>14}  dtype",
            "part", "tensors", "values", "bytes"
        )?;
        for p in &self.parts {
            let dtypes: Vec<String> = p.dtypes.iter().map(|d| d.to_string()).collect();
            writeln!(
                f,
                "{:<30} {:>8} {:>14} {:>14}  {}",
                p.name,
                p.tensors,
                thousands(p.values),
                thousands(p.bytes),
                dtypes.join("+")
            )?;
        }
        writeln!(
            f,
            "{:<30} {:>8} {:>14} {:>14}",
            "total",
            self.tensors,
            thousands(self.values),
            thousands(self.bytes)
        )?;
        if !self.skipped.is_empty() {
            writeln!(
                f,
                "skipped     {} (integer buffer)",
                self.skipped.join(", ")
            )?;
        }
        if !self.ignored.is_empty() {
            writeln!(f, "ignored     {}", self.ignored.join(", "))?;
        }
        write!(f, "validation  {}", self.validation)
    }
}

/// Opens a model directory laid out like the Hugging Face `BAAI/SegVol` export: `config.json`
/// (optional; without it the released architecture, spec §0), then `model.safetensors`, else
/// `pytorch_model.bin`, else `SegVol_v1.pth`. A checkpoint file given instead of a directory is
/// opened directly, with a `config.json` beside it if there is one.
pub fn open_model_dir(dir: &Path) -> Result<(ModelConfig, WeightStore)> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    let (config_path, weights) = if meta.is_dir() {
        let weights = ["model.safetensors", "pytorch_model.bin", "SegVol_v1.pth"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::io(
                    dir,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no model.safetensors, pytorch_model.bin or SegVol_v1.pth in this directory",
                    ),
                )
            })?;
        (dir.join("config.json"), weights)
    } else {
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        (parent.join("config.json"), dir.to_path_buf())
    };
    // A `config.json` that exists but is not a file (a directory, a fifo) is an error, never
    // silently the released architecture.
    let cfg = match std::fs::metadata(&config_path) {
        Ok(_) => ModelConfig::from_file(&config_path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ModelConfig::full(),
        Err(e) => return Err(Error::io(&config_path, e)),
    };
    let store = WeightStore::open(&weights, &cfg)?;
    Ok((cfg, store))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_stripped() {
        assert_eq!(
            normalize_key("model.image_encoder.norm.weight"),
            "image_encoder.norm.weight"
        );
        assert_eq!(
            normalize_key("module.image_encoder.norm.weight"),
            "image_encoder.norm.weight"
        );
        assert_eq!(
            normalize_key("image_encoder.norm.weight"),
            "image_encoder.norm.weight"
        );
    }

    #[test]
    fn store_is_send_and_sync() {
        // The model shares one store across rayon workers and backends.
        fn check<T: Send + Sync>() {}
        check::<WeightStore>();
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(180_891_293), "180,891,293");
    }

    #[test]
    fn random_store_matches_schema() {
        let cfg = ModelConfig::tiny();
        let store = WeightStore::random(&cfg, 1);
        assert_eq!(store.len(), 204);
        assert_eq!(store.total_values(), 2_240_669 - 77);
        let (shape, v) = store.require("image_encoder.norm.weight").unwrap();
        assert_eq!(shape, &[96]);
        assert_eq!(
            v,
            generate_f32("image_encoder.norm.weight", &[96], 1).as_slice()
        );
        assert!(store.require("nope").is_err());
    }
}
