//! SegVol, written once as ops (DESIGN.md "Layers"): the [`image_encoder`], the host-side
//! [`prompt_encoder`], the CLIP [`text_encoder`] and the [`mask_decoder`] each build a
//! [`Program`] per shape key and return its typed inputs and outputs; [`SegVol`] binds them.
//! Caching, the arena, staging, CUDA graphs and profiling belong to the [`crate::runtime`].
//!
//! The split follows what can be reused: the image embedding of a window is independent of
//! the prompt (computed once per zoom-out volume and reused by every prompt), and a text
//! embedding depends only on its string (cached).

pub mod image_encoder;
pub mod mask_decoder;
pub mod ops;
pub mod prompt_encoder;
pub mod text_encoder;

use crate::backend::{Addr, Backend, Buffer};
use crate::config::ModelConfig;
use crate::dtype::{decode_f32, encode_f32, DType};
use crate::error::{Error, Result};
use crate::program::exec::WeightTable;
use crate::program::planner::{self, Plan};
use crate::program::{Program, TensorId, TensorKind};
use crate::runtime::{Lane, Runtime};
use crate::tensor::HostTensor;
use crate::tokenizer::TextTokenizer;
use image_encoder::EncoderIo;
use mask_decoder::{DecoderIo, DecoderKey};
use parking_lot::Mutex;
use prompt_encoder::{PromptEncoder, TokenKind};
use std::collections::HashMap;
use std::sync::Arc;
use text_encoder::TextIo;

pub use crate::runtime::{OpTiming, RuntimeStats};

/// Key of the load-time dense positional encoding `(N, C)` in the weights region.
pub const DENSE_PE_KEY: &str = "derived.dense_pe";

/// Host access to checkpoint tensors by unprefixed key (f32).
pub trait HostWeights: Send + Sync {
    /// The tensor `key`, if the checkpoint has it.
    fn host_tensor(&self, key: &str) -> Option<&[f32]>;
}

impl HostWeights for crate::weights::WeightStore {
    fn host_tensor(&self, key: &str) -> Option<&[f32]> {
        self.get(key)
    }
}

/// A prompt for one model call, in window voxel coordinates (d, h, w) (spec §2).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowPrompt {
    /// A category name; the model sees it through the template (spec §3).
    pub text: Option<String>,
    /// `[d0, h0, w0, d1, h1, w1]`, corners inclusive. `[-1; 6]` is the official empty box.
    pub bbox: Option<[f32; 6]>,
    /// Points and their labels (1 positive, 0 negative, -1 not a point).
    pub points: Vec<[f32; 3]>,
    pub labels: Vec<f32>,
}

impl WindowPrompt {
    /// Whether the prompt holds anything.
    pub fn is_empty(&self) -> bool {
        self.text.is_none() && self.bbox.is_none() && self.points.is_empty()
    }
}

/// A text prompt through CLIP: cached per string.
#[derive(Clone, Debug)]
pub struct TextEmbedding {
    pub tokens: crate::tokenizer::Tokens,
    /// CLIP pooled output (`text_pooled`).
    pub pooled: Vec<f32>,
    /// After `dim_align` (`text_embedding`), the decoder's text token.
    pub embedding: Vec<f32>,
}

/// Image tokens of `batch` windows on the device, `(B, N, C)` in the model dtype.
pub struct ImageEmbedding {
    buf: Buffer,
    batch: usize,
    /// Bytes of one window's tokens.
    window_bytes: usize,
}

impl ImageEmbedding {
    /// Number of windows.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Device address of window `b`'s tokens (all windows: `addr(0)`).
    pub fn addr(&self, b: usize) -> Addr {
        self.buf.at(b * self.window_bytes)
    }
}

/// One prompt made ready for the decoder: the token rows, their kinds, and the text.
struct DecoderInput {
    tokens: Vec<f32>,
    kinds: Vec<TokenKind>,
    text: Option<Arc<TextEmbedding>>,
}

/// The result of [`SegVol::call`].
pub struct CallOutput {
    /// `(1, 1, D, H, W)` logits.
    pub logits: HostTensor,
    /// Intermediate tensors under the fixtures' names, when asked for.
    pub stages: Vec<(String, HostTensor)>,
    /// The sparse token kinds, in order.
    pub sparse_kinds: Vec<TokenKind>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ProgramKey {
    Encoder { batch: usize, stages: bool },
    Text { len: usize, eos: usize },
    Decoder { key: DecoderKey, stages: bool },
}

/// The typed inputs and outputs of each kind of program.
enum Io {
    Encoder(EncoderIo),
    Text(TextIo),
    Decoder(DecoderIo),
}

type Compiled = crate::runtime::Compiled<ProgramKey, Io>;

/// A program's typed IO of the expected kind; anything else is a bug of the key → builder map.
macro_rules! io_of {
    ($c:expr, $kind:ident) => {
        match &$c.io {
            Io::$kind(io) => *io,
            _ => {
                return Err(Error::Internal(format!(
                    "program {} is not a {} program",
                    $c.program.name,
                    stringify!($kind)
                )))
            }
        }
    };
}

/// Weights on the device: one region (or, on host-addressable f32 backends, the
/// memory-mapped checkpoint itself) plus the load-time derived tensors.
pub struct DeviceWeights {
    table: HashMap<String, Addr>,
    /// Bytes held on the device (not counting zero-copy tensors).
    pub device_bytes: usize,
    /// Tensors declared constant to the backend, released on drop.
    retained: Vec<Addr>,
    backend: Arc<dyn Backend>,
    _region: Option<Buffer>,
    _host: Arc<dyn HostWeights>,
}

impl Drop for DeviceWeights {
    fn drop(&mut self) {
        for &a in &self.retained {
            self.backend.release_constant(a);
        }
    }
}

impl WeightTable for DeviceWeights {
    fn weight_addr(&self, key: &str) -> Option<Addr> {
        self.table.get(key).copied()
    }
}

impl DeviceWeights {
    /// Places `keys` (with their host data) and the `derived` tensors on `backend`, and
    /// declares the keys that `hot` selects constant to it ([`Backend::retain_constant`]:
    /// the weights run on every call, worth a layout the backend derives once).
    fn upload(
        backend: &Arc<dyn Backend>,
        host: Arc<dyn HostWeights>,
        keys: &[String],
        derived: &[(&str, Vec<f32>)],
        hot: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        let dtype = backend.dtype();
        let zero_copy = backend.host_addressable() && dtype == DType::F32;
        let mut table = HashMap::new();
        let mut retained = Vec::new();
        let mut layout: Vec<(String, &[f32], usize)> = Vec::new();
        let mut total = 0usize;
        for key in keys {
            let data = host
                .host_tensor(key)
                .ok_or_else(|| Error::Internal(format!("weight `{key}` is not loaded")))?;
            if zero_copy && (data.as_ptr() as usize).is_multiple_of(4) {
                table.insert(key.clone(), data.as_ptr() as Addr);
                if hot(key) {
                    backend.retain_constant(data.as_ptr() as Addr, data.len() * 4);
                    retained.push(data.as_ptr() as Addr);
                }
                continue;
            }
            layout.push((key.clone(), data, total));
            total += planner::align(data.len() * dtype.size());
        }
        for (key, data) in derived {
            layout.push((key.to_string(), data.as_slice(), total));
            total += planner::align(data.len() * dtype.size());
        }
        let region = if total > 0 {
            let buf = backend.alloc(total)?;
            for (key, data, off) in &layout {
                let bytes = encode_f32(data, dtype);
                // SAFETY: `off + bytes.len()` lies inside the region just allocated.
                unsafe { backend.upload(buf.at(*off), &bytes)? };
                table.insert(key.clone(), buf.at(*off));
                if hot(key) {
                    backend.retain_constant(buf.at(*off), bytes.len());
                    retained.push(buf.at(*off));
                }
            }
            Some(buf)
        } else {
            None
        };
        Ok(DeviceWeights {
            table,
            device_bytes: total,
            retained,
            backend: backend.clone(),
            _region: region,
            _host: host,
        })
    }
}

/// A loaded SegVol model on one backend.
pub struct SegVol {
    cfg: ModelConfig,
    backend: Arc<dyn Backend>,
    /// The same device in f32, for the text tower (the same `Arc` when the model runs in f32).
    text_backend: Arc<dyn Backend>,
    host: Arc<dyn HostWeights>,
    weights: DeviceWeights,
    /// The text tower's weights in f32, when they are not in `weights`.
    text_weights: Option<DeviceWeights>,
    prompts: PromptEncoder,
    dense_pe: Vec<f32>,
    tokenizer: TextTokenizer,
    texts: Mutex<HashMap<String, Arc<TextEmbedding>>>,
    runtime: Runtime<ProgramKey, Io>,
    /// Held for each step of a pipeline session ([`SegVol::exclusive`]).
    steps: Mutex<()>,
}

impl SegVol {
    /// Builds the model from validated host weights.
    pub fn new(
        cfg: ModelConfig,
        host: Arc<dyn HostWeights>,
        tokenizer: TextTokenizer,
        backend: Arc<dyn Backend>,
    ) -> Result<Self> {
        // Every id the tokenizer can produce must index the token embedding (spec §3).
        tokenizer.check_vocab(cfg.text.vocab)?;
        let prompts = PromptEncoder::new(&cfg, host.as_ref())?;
        let dense_pe = prompts.dense_pe();
        // The CLIP tower runs in f32 whatever the storage dtype: it costs ~1 GFLOP once per
        // distinct text (cached), and bf16 would cost it ~1e-2 of relative accuracy.
        let text_backend = if backend.dtype() == DType::F32 {
            backend.clone()
        } else {
            backend.with_dtype(DType::F32)?
        };
        // Upload exactly the weights the programs use (not the unused IoU head, mask
        // downscaling or position ids), each in its program's precision.
        let dtype = backend.dtype();
        let main_probes = [
            image_encoder::build(&cfg, 1, dtype, false).0,
            mask_decoder::build(
                &cfg,
                DecoderKey {
                    batch: 1,
                    sparse: 1,
                    text: true,
                },
                dtype,
                false,
            )
            .0,
        ];
        let text_probe = text_encoder::build(&cfg, 2, 1, DType::F32).0;
        let main_keys = weight_keys(&main_probes);
        let text_keys = weight_keys(std::slice::from_ref(&text_probe));
        let shared = Arc::ptr_eq(&backend, &text_backend);
        // The CLIP tower runs once per distinct text: only the encoder's and decoder's
        // weights are worth a derived layout.
        let hot_keys: std::collections::HashSet<String> = main_keys.iter().cloned().collect();
        let mut keys = main_keys;
        if shared {
            keys.extend(text_keys.iter().cloned());
        }
        let weights = DeviceWeights::upload(
            &backend,
            host.clone(),
            &keys,
            &[(DENSE_PE_KEY, dense_pe.clone())],
            &|k| hot_keys.contains(k),
        )?;
        let text_weights = if shared {
            None
        } else {
            Some(DeviceWeights::upload(
                &text_backend,
                host.clone(),
                &text_keys,
                &[],
                &|_| false,
            )?)
        };
        Ok(SegVol {
            cfg,
            text_backend,
            host,
            weights,
            text_weights,
            prompts,
            dense_pe,
            tokenizer,
            texts: Mutex::new(HashMap::new()),
            runtime: Runtime::new(backend.clone()),
            steps: Mutex::new(()),
            backend,
        })
    }

    /// Loads a model directory laid out like the Hugging Face export (or a weights file) onto
    /// `backend`: config, validated weights, tokenizer (spec §5).
    pub fn load(dir: &std::path::Path, backend: Arc<dyn Backend>) -> Result<Self> {
        let (cfg, store) = crate::weights::open_model_dir(dir)?;
        let tok_dir = if dir.is_dir() {
            Some(dir)
        } else {
            dir.parent()
        };
        let tokenizer =
            TextTokenizer::for_model_dir(tok_dir, &cfg.text_template, cfg.text.max_positions)?;
        Self::new(cfg, Arc::new(store), tokenizer, backend)
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The weights on the device.
    pub fn weights(&self) -> &DeviceWeights {
        &self.weights
    }

    /// The program of `key`, built once ([`Runtime::program`]).
    fn compiled(&self, key: ProgramKey) -> Result<Arc<Compiled>> {
        let dtype = self.backend.dtype();
        self.runtime.program(key, || match key {
            ProgramKey::Encoder { batch, stages } => {
                let (p, io) = image_encoder::build(&self.cfg, batch, dtype, stages);
                (p, Io::Encoder(io))
            }
            ProgramKey::Text { len, eos } => {
                let (p, io) = text_encoder::build(&self.cfg, len, eos, self.text_backend.dtype());
                (p, Io::Text(io))
            }
            ProgramKey::Decoder { key, stages } => {
                let (p, io) = mask_decoder::build(&self.cfg, key, dtype, stages);
                (p, Io::Decoder(io))
            }
        })
    }

    /// Where a program runs: the text tower on the f32 twin with its own weights, the rest on
    /// the model's backend.
    fn lane(&self, c: &Compiled) -> Lane<'_> {
        match (c.key, &self.text_weights) {
            (ProgramKey::Text { .. }, Some(w)) => Lane {
                backend: self.text_backend.as_ref(),
                weights: w,
            },
            (ProgramKey::Text { .. }, None) => Lane {
                backend: self.text_backend.as_ref(),
                weights: &self.weights,
            },
            _ => Lane {
                backend: self.backend.as_ref(),
                weights: &self.weights,
            },
        }
    }

    fn run(&self, c: &Compiled, ext: &[(TensorId, Addr)]) -> Result<()> {
        self.runtime.run(c, self.lane(c), ext)
    }

    /// The model's device to one caller at a time, for a step of a pipeline session (opening
    /// a volume, one prompt). Programs alone are safe to run from several threads (the
    /// runtime locks each run), but a step also runs volume ops straight on the backend, and
    /// those share the backend's scratch memory: two sessions on one model in two threads
    /// take turns step by step rather than corrupt each other's reductions.
    pub fn exclusive(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.steps.lock()
    }

    /// Programs built, arena allocations and graph captures so far.
    pub fn runtime_stats(&self) -> RuntimeStats {
        self.runtime.stats()
    }

    fn upload_f32(&self, data: &[f32], dtype: DType) -> Result<Buffer> {
        let bytes = encode_f32(data, dtype);
        let buf = self.backend.alloc(bytes.len().max(1))?;
        // SAFETY: the buffer was just allocated with room for `bytes`.
        unsafe { self.backend.upload(buf.addr(), &bytes)? };
        Ok(buf)
    }

    fn download_f32(&self, addr: Addr, n: usize, dtype: DType) -> Result<Vec<f32>> {
        let mut bytes = vec![0u8; n * dtype.size()];
        // SAFETY: callers pass an address inside a live buffer holding `n` values of `dtype`.
        unsafe { self.backend.download(addr, &mut bytes)? };
        Ok(decode_f32(&bytes, dtype))
    }

    /// Tokens of a category name through the template (spec §3): what sizes its text program.
    pub fn token_count(&self, text: &str) -> Result<usize> {
        Ok(self.tokenizer.encode(text)?.ids.len())
    }

    /// The text embedding of a category name (spec §3), cached per string.
    pub fn text_embedding(&self, text: &str) -> Result<Arc<TextEmbedding>> {
        if let Some(t) = self.texts.lock().get(text) {
            return Ok(t.clone());
        }
        let tokens = self.tokenizer.encode(text)?;
        let c = self.compiled(ProgramKey::Text {
            len: tokens.ids.len(),
            eos: tokens.eos,
        })?;
        let dtype = self.text_backend.dtype();
        let ids: Vec<i32> = tokens.ids.iter().map(|&i| i as i32).collect();
        let ids_buf = self.backend.alloc(ids.len() * 4)?;
        // SAFETY: sized for the ids.
        unsafe {
            self.backend
                .upload(ids_buf.addr(), bytemuck::cast_slice(&ids))?
        };
        let (w, dim) = (self.cfg.text.hidden, self.cfg.decoder.dim);
        let out = self.backend.alloc((w + dim) * dtype.size())?;
        let emb_addr = out.at(w * dtype.size());
        let io = io_of!(c, Text);
        self.run(
            &c,
            &[
                (io.ids, ids_buf.addr()),
                (io.pooled, out.addr()),
                (io.embedding, emb_addr),
            ],
        )?;
        let pooled = self.download_f32(out.addr(), w, dtype)?;
        let embedding = self.download_f32(emb_addr, dim, dtype)?;
        let t = Arc::new(TextEmbedding {
            tokens,
            pooled,
            embedding,
        });
        self.texts.lock().insert(text.to_string(), t.clone());
        Ok(t)
    }

    /// Encodes `batch` windows already on the device (`(B, 1, D, H, W)` f32 at `images`) into
    /// image tokens `(B, N, C)` in the model dtype at `out`.
    pub fn encode_into(&self, images: Addr, batch: usize, out: Addr) -> Result<()> {
        let c = self.compiled(ProgramKey::Encoder {
            batch,
            stages: false,
        })?;
        let io = io_of!(c, Encoder);
        self.run(&c, &[(io.image, images), (io.embedding, out)])
    }

    /// Bytes of the image tokens of one window.
    pub fn embedding_bytes(&self) -> usize {
        self.cfg.num_tokens() * self.cfg.decoder.dim * self.backend.dtype().size()
    }

    /// [`Self::encode_into`] a new buffer.
    pub fn encode(&self, images: Addr, batch: usize) -> Result<ImageEmbedding> {
        let buf = self.backend.alloc(batch * self.embedding_bytes())?;
        self.encode_into(images, batch, buf.addr())?;
        Ok(ImageEmbedding {
            buf,
            batch,
            window_bytes: self.embedding_bytes(),
        })
    }

    /// The decoder token sequence `[iou; mask tokens; sparse]` of one prompt (spec §4.1).
    fn tokens(&self, prompt: &WindowPrompt) -> Result<DecoderInput> {
        if prompt.is_empty() {
            return Err(Error::Prompt(
                "no prompt: give a text, a box or points".into(),
            ));
        }
        let text = prompt
            .text
            .as_deref()
            .map(|t| self.text_embedding(t))
            .transpose()?;
        let (sparse, kinds) = self.prompts.sparse(
            &prompt.points,
            &prompt.labels,
            prompt.bbox,
            text.as_ref().map(|t| t.embedding.as_slice()),
        )?;
        let mut tokens = Vec::with_capacity(
            sparse.len() + (1 + self.cfg.decoder.mask_tokens) * self.cfg.decoder.dim,
        );
        for key in [
            "mask_decoder.iou_token.weight",
            "mask_decoder.mask_tokens.weight",
        ] {
            let t = self
                .host
                .host_tensor(key)
                .ok_or_else(|| Error::Internal(format!("weight `{key}` is not loaded")))?;
            tokens.extend_from_slice(t);
        }
        tokens.extend_from_slice(&sparse);
        Ok(DecoderInput {
            tokens,
            kinds,
            text,
        })
    }

    /// Decodes one prompt per window: image tokens of `prompts.len()` windows at `emb`, f32
    /// logits `(B, 1, D, H, W)` written at `logits`. Windows whose prompts have the same shape
    /// run as one batch; otherwise each window runs alone.
    pub fn decode(&self, emb: Addr, prompts: &[WindowPrompt], logits: Addr) -> Result<()> {
        let dtype = self.backend.dtype();
        let mut built = Vec::with_capacity(prompts.len());
        for p in prompts {
            built.push(self.tokens(p)?);
        }
        let same = built.windows(2).all(|w| {
            w[0].kinds.len() == w[1].kinds.len() && w[0].text.is_some() == w[1].text.is_some()
        });
        let groups: Vec<Vec<usize>> = if same {
            vec![(0..prompts.len()).collect()]
        } else {
            (0..prompts.len()).map(|i| vec![i]).collect()
        };
        let win_bytes = (self.cfg.window_voxels() * 4) as u64;
        let emb_bytes = self.embedding_bytes() as u64;
        for g in groups {
            let first = &built[g[0]];
            let key = DecoderKey {
                batch: g.len(),
                sparse: first.kinds.len(),
                text: first.text.is_some(),
            };
            let c = self.compiled(ProgramKey::Decoder { key, stages: false })?;
            let mut host: Vec<f32> = g
                .iter()
                .flat_map(|&i| built[i].tokens.iter().copied())
                .collect();
            let tok_len = host.len();
            if key.text {
                host.extend(
                    g.iter()
                        .flat_map(|&i| built[i].text.as_ref().unwrap().embedding.iter().copied()),
                );
            }
            let io = io_of!(c, Decoder);
            let bind = |staging: Addr| {
                let mut ext = vec![
                    (io.image_embedding, emb + g[0] as u64 * emb_bytes),
                    (io.tokens, staging),
                    (io.logits, logits + g[0] as u64 * win_bytes),
                ];
                if let Some(t) = io.text_embedding {
                    ext.push((t, staging + (tok_len * dtype.size()) as u64));
                }
                ext
            };
            self.runtime
                .run_staged(&c, self.lane(&c), &encode_f32(&host, dtype), bind)?;
        }
        Ok(())
    }

    /// Runs the encoder (batch `batch`, images at `images`) and the decoder for `prompt` on
    /// every window once, synchronising after each op, and returns every op's wall time with
    /// its counted FLOPs (`segvol bench`). The text embedding must already be cached for the
    /// decoder times to exclude CLIP.
    pub fn profile(
        &self,
        images: Addr,
        batch: usize,
        prompt: &WindowPrompt,
    ) -> Result<Vec<OpTiming>> {
        let dtype = self.backend.dtype();
        let emb = self.backend.alloc(batch * self.embedding_bytes())?;
        let logits = self.backend.alloc(batch * self.cfg.window_voxels() * 4)?;
        let mut out = Vec::new();
        let enc = self.compiled(ProgramKey::Encoder {
            batch,
            stages: false,
        })?;
        let eio = io_of!(enc, Encoder);
        out.extend(self.runtime.run_profiled(
            &enc,
            self.lane(&enc),
            &[(eio.image, images), (eio.embedding, emb.addr())],
        )?);
        let input = self.tokens(prompt)?;
        let key = DecoderKey {
            batch,
            sparse: input.kinds.len(),
            text: input.text.is_some(),
        };
        let dec = self.compiled(ProgramKey::Decoder { key, stages: false })?;
        let mut host: Vec<f32> = Vec::new();
        for _ in 0..batch {
            host.extend_from_slice(&input.tokens);
        }
        let tok_len = host.len();
        if let Some(t) = &input.text {
            for _ in 0..batch {
                host.extend_from_slice(&t.embedding);
            }
        }
        let staging = self.upload_f32(&host, dtype)?;
        let dio = io_of!(dec, Decoder);
        let mut ext = vec![
            (dio.image_embedding, emb.addr()),
            (dio.tokens, staging.addr()),
            (dio.logits, logits.addr()),
        ];
        if let Some(t) = dio.text_embedding {
            ext.push((t, staging.addr() + (tok_len * dtype.size()) as u64));
        }
        out.extend(self.runtime.run_profiled(&dec, self.lane(&dec), &ext)?);
        Ok(out)
    }

    /// Bytes of the arena now held.
    pub fn arena_bytes(&self) -> usize {
        self.runtime.arena_bytes()
    }

    /// Makes sure the arena holds at least `bytes`, so that later calls allocate nothing.
    pub fn reserve_arena(&self, bytes: usize) -> Result<()> {
        self.runtime.reserve_arena(bytes)
    }

    /// One whole model call on a host window `(D, H, W)` in [0, 1] (`segvol window`). With
    /// `stages`, also returns the intermediate tensors under the fixtures' names.
    pub fn call(&self, image: &[f32], prompt: &WindowPrompt, stages: bool) -> Result<CallOutput> {
        let cfg = &self.cfg;
        let [d, h, w] = cfg.spatial_size;
        if image.len() != cfg.window_voxels() {
            return Err(Error::Input(format!(
                "the model takes one {d}x{h}x{w} window ({} values), got {}",
                cfg.window_voxels(),
                image.len()
            )));
        }
        let img = self.upload_f32(image, DType::F32)?;
        let logits = self.backend.alloc(cfg.window_voxels() * 4)?;
        let mut out_stages: Vec<(String, HostTensor)> = Vec::new();
        let input = self.tokens(prompt)?;
        if stages {
            let emb = self.encode_with_stages(img.addr(), &mut out_stages)?;
            self.decode_with_stages(emb.addr(0), &input, logits.addr(), &mut out_stages)?;
        } else {
            let emb = self.encode(img.addr(), 1)?;
            self.decode(emb.addr(0), std::slice::from_ref(prompt), logits.addr())?;
        }
        let v = self.download_f32(logits.addr(), cfg.window_voxels(), DType::F32)?;
        // Finite weights (checked at load) and a finite window must give finite logits; else
        // the model overflowed f32 or the device failed, and the mask would be silently empty.
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            if image.iter().all(|x| x.is_finite()) {
                return Err(Error::device(
                    self.backend.name(),
                    format!(
                        "the model call returned non-finite logits ({} at element {i}): the model overflowed f32 (weights too large?) or the device failed",
                        v[i]
                    ),
                ));
            }
        }
        Ok(CallOutput {
            logits: HostTensor::new(vec![1, 1, d, h, w], v),
            stages: out_stages,
            sparse_kinds: input.kinds,
        })
    }

    /// The encoder of one window with its stage outputs: `patch_embedding`, `vit_block0`,
    /// `image_embedding` and `dense_pe` in the spec's `(1, C, gD, gH, gW)` layout.
    fn encode_with_stages(
        &self,
        image: Addr,
        out: &mut Vec<(String, HostTensor)>,
    ) -> Result<ImageEmbedding> {
        let cfg = &self.cfg;
        let dtype = self.backend.dtype();
        let (n, dim) = (cfg.num_tokens(), cfg.decoder.dim);
        let c = self.compiled(ProgramKey::Encoder {
            batch: 1,
            stages: true,
        })?;
        let step = self.embedding_bytes();
        let buf = self.backend.alloc(3 * step)?;
        let io = io_of!(c, Encoder);
        let (patch, block0) = io
            .stages
            .ok_or_else(|| Error::Internal("the stages encoder has no stage outputs".into()))?;
        self.run(
            &c,
            &[
                (io.image, image),
                (io.embedding, buf.addr()),
                (patch, buf.at(step)),
                (block0, buf.at(2 * step)),
            ],
        )?;
        for (i, name) in [(1, "patch_embedding"), (2, "vit_block0")] {
            let v = self.download_f32(buf.at(i * step), n * dim, dtype)?;
            out.push((name.into(), HostTensor::new(vec![1, n, dim], v)));
        }
        let tokens = self.download_f32(buf.addr(), n * dim, dtype)?;
        let g = cfg.token_grid();
        out.push(("image_embedding".into(), channels_first(&tokens, n, dim, g)));
        out.push(("dense_pe".into(), channels_first(&self.dense_pe, n, dim, g)));
        Ok(ImageEmbedding {
            buf,
            batch: 1,
            window_bytes: step,
        })
    }

    /// The decoder of one window with its stage outputs: `text_pooled`, `text_embedding`,
    /// `sparse_embeddings`, `decoder_tokens`, `decoder_image`, `upscaled_embedding`,
    /// `low_res_masks`.
    fn decode_with_stages(
        &self,
        emb: Addr,
        input: &DecoderInput,
        logits: Addr,
        out: &mut Vec<(String, HostTensor)>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let dtype = self.backend.dtype();
        let (n, dim) = (cfg.num_tokens(), cfg.decoder.dim);
        let t = input.tokens.len() / dim;
        let key = DecoderKey {
            batch: 1,
            sparse: input.kinds.len(),
            text: input.text.is_some(),
        };
        let c = self.compiled(ProgramKey::Decoder { key, stages: true })?;
        let tok_buf = self.upload_f32(&input.tokens, dtype)?;
        let (c8, m) = (cfg.upscale_channels().1, cfg.decoder.mask_tokens);
        let g4 = cfg.upscale_grids().1;
        let names = [
            "decoder_tokens",
            "decoder_image",
            "upscaled_embedding",
            "low_res_masks",
        ];
        let shapes: [Vec<usize>; 4] = [
            vec![1, t, dim],
            vec![1, n, dim],
            vec![1, c8, g4[0], g4[1], g4[2]],
            vec![1, m, g4[0], g4[1], g4[2]],
        ];
        let sizes = shapes.clone().map(|s| s.iter().product::<usize>());
        let sbuf = self
            .backend
            .alloc(sizes.iter().sum::<usize>() * dtype.size())?;
        let offs: Vec<Addr> = sizes
            .iter()
            .scan(0usize, |acc, &s| {
                let o = sbuf.at(*acc * dtype.size());
                *acc += s;
                Some(o)
            })
            .collect();
        let text_buf = input
            .text
            .as_ref()
            .map(|te| self.upload_f32(&te.embedding, dtype))
            .transpose()?;
        let io = io_of!(c, Decoder);
        let stage_ids = io
            .stages
            .ok_or_else(|| Error::Internal("the stages decoder has no stage outputs".into()))?;
        let mut ext = vec![
            (io.image_embedding, emb),
            (io.tokens, tok_buf.addr()),
            (io.logits, logits),
        ];
        ext.extend(stage_ids.iter().zip(&offs).map(|(&t, &a)| (t, a)));
        if let (Some(t), Some(tb)) = (io.text_embedding, &text_buf) {
            ext.push((t, tb.addr()));
        }
        self.run(&c, &ext)?;
        if let Some(te) = &input.text {
            out.push((
                "text_pooled".into(),
                HostTensor::new(vec![1, te.pooled.len()], te.pooled.clone()),
            ));
            out.push((
                "text_embedding".into(),
                HostTensor::new(vec![1, dim], te.embedding.clone()),
            ));
        }
        let ns = input.kinds.len();
        let sparse = input.tokens[(t - ns) * dim..].to_vec();
        out.push((
            "sparse_embeddings".into(),
            HostTensor::new(vec![1, ns, dim], sparse),
        ));
        for i in 0..4 {
            let v = self.download_f32(offs[i], sizes[i], dtype)?;
            out.push((names[i].into(), HostTensor::new(shapes[i].clone(), v)));
        }
        Ok(())
    }
}

/// The checkpoint keys the programs read (derived tensors excluded), in first-use order.
fn weight_keys(programs: &[Program]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for p in programs {
        for t in &p.tensors {
            if let TensorKind::Weight(k) = &t.kind {
                if k != DENSE_PE_KEY && !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
    }
    keys
}

/// Token layout `(N, C)` to the spec's `(1, C, gD, gH, gW)` view (spec §1.4).
fn channels_first(tokens: &[f32], n: usize, c: usize, g: [usize; 3]) -> HostTensor {
    let mut out = vec![0.0; n * c];
    for t in 0..n {
        for ch in 0..c {
            out[ch * n + t] = tokens[t * c + ch];
        }
    }
    HostTensor::new(vec![1, c, g[0], g[1], g[2]], out)
}

/// The memory plan of one batched model call, computed without weights or a device: the
/// programs with their activation plans, and the sizes of the weights region, the shared
/// arena and the caller-bound buffers (`segvol plan`).
pub struct CallPlan {
    pub programs: Vec<(Program, Plan)>,
    /// Weights region: every weight the programs use plus the derived dense PE, in the
    /// storage dtype.
    pub weight_bytes: usize,
    /// One arena serves every program in turn: the largest plan.
    pub arena_bytes: usize,
    /// Input windows, image embedding, decoder tokens and text, output logits.
    pub io_bytes: usize,
}

impl CallPlan {
    /// Plans a call of `batch` windows with `sparse` prompt tokens and a text of `text_len`
    /// tokens (0: no text).
    pub fn new(
        cfg: &ModelConfig,
        dtype: DType,
        batch: usize,
        sparse: usize,
        text_len: usize,
    ) -> Result<Self> {
        let mut programs = vec![image_encoder::build(cfg, batch, dtype, false).0];
        if text_len > 0 {
            // The text tower always runs in f32 (see SegVol::new).
            programs.push(text_encoder::build(cfg, text_len, text_len - 1, DType::F32).0);
        }
        let key = DecoderKey {
            batch,
            sparse,
            text: text_len > 0,
        };
        programs.push(mask_decoder::build(cfg, key, dtype, false).0);
        let mut seen = std::collections::HashSet::new();
        let mut weight_bytes = 0;
        let mut io = std::collections::HashMap::new();
        let mut out = Vec::new();
        for p in programs {
            for t in &p.tensors {
                match &t.kind {
                    TensorKind::Weight(k) if seen.insert(k.clone()) => {
                        weight_bytes += planner::align(t.bytes())
                    }
                    // Externals shared between programs (the image embedding) count once.
                    TensorKind::External => {
                        io.insert(t.name.clone(), planner::align(t.bytes()));
                    }
                    _ => {}
                }
            }
            let plan = planner::plan(&p)?;
            out.push((p, plan));
        }
        let arena_bytes = out.iter().map(|(_, pl)| pl.arena_bytes).max().unwrap_or(0);
        Ok(CallPlan {
            programs: out,
            weight_bytes,
            arena_bytes,
            io_bytes: io.values().sum(),
        })
    }

    /// Device bytes of one call: weights + arena + buffers.
    pub fn total_bytes(&self) -> usize {
        self.weight_bytes + self.arena_bytes + self.io_bytes
    }

    /// Counted FLOPs of the call (spec §8.3).
    pub fn flops(&self) -> f64 {
        self.programs.iter().map(|(p, _)| p.flops()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_call_counts_match_the_spec() {
        // Spec §8.3: ~506 GFLOP for the ViT, ~22 for the decoder, ~0.53 TFLOP per call.
        let cfg = ModelConfig::full();
        let plan = CallPlan::new(&cfg, DType::BF16, 1, 1, 12).unwrap();
        let enc = plan.programs[0].0.flops() / 1e9;
        assert!((495.0..520.0).contains(&enc), "encoder {enc} GFLOP");
        let total = plan.flops() / 1e12;
        assert!((0.51..0.56).contains(&total), "call {total} TFLOP");
        // The weights region holds every weight the programs use, once: the 180,890,064
        // parameters less the unused IoU head (263,684) and mask downscaling (1,100), less the
        // 8,832 prompt-encoder and token values used on the host, plus the 2048 x 768 dense PE
        // = 182,178,176 values (+ alignment), of which the text tower's 63,559,936 (CLIP
        // without position ids, and dim_align) are f32 and the other 118,618,240 bf16.
        let bytes = 118_618_240 * 2 + 63_559_936 * 4;
        assert!(
            (bytes..bytes + 256 * 500).contains(&plan.weight_bytes),
            "{}",
            plan.weight_bytes
        );
    }
}
