//! The official zoom-out-zoom-in pipeline on one volume (spec §6), top to bottom:
//!
//! 1. upload the CT and normalise it in place (§6.2), crop it to its foreground (§6.3);
//! 2. resize the crop to one window with nearest-exact and encode it once (§6.4);
//! 3. per prompt: map the user's prompt into the zoom-out frame (§6.5), decode (§6.6), bring the
//!    logits back to the cropped grid with legacy nearest (§6.6), take the ROI (§6.7), run the
//!    sliding windows over it in batches with the official window prompts and average them
//!    (§6.8), overwrite the ROI (§6.8 step 8), threshold (§6.9).
//!
//! Every step is a call on the model's [`Backend`], on buffers of one region laid out by the
//! volume's memory [`plan`] before the first launch. The pure geometry lives in [`geometry`],
//! the device preprocessing steps in [`preprocess`].
//!
//! Departures from the official code (all documented in the README):
//! - box and points may be combined (the official code asserts they are not);
//! - in the zoom-in, point prompts are the user's points that fall inside the window plus the
//!   window box, chosen deterministically (the official code re-samples points at random);
//! - a box thinner than one zoom-out voxel keeps its centre voxel instead of vanishing
//!   ([`geometry::box_zoom_out_dhw`]).

pub mod geometry;
pub mod plan;
pub mod preprocess;

use crate::backend::{range, AccumulateArgs, Addr, BBox, Backend, Buffer, CopyBoxArgs, InterpMode};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::{SegVol, WindowPrompt};
use geometry::{Roi, SlidingWindows};
use plan::{Buf, VolumePlan};
use preprocess::NormStats;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Device memory left free by the default budget (CUDA context growth, cuBLASLt, fragmentation).
pub const MEMORY_MARGIN: usize = 1 << 30;

/// Host memory available to this process now: `MemAvailable` of /proc/meminfo, or the cgroup
/// v2 limit less its current use when that is lower; `None` where neither can be read.
pub fn host_available_memory() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let avail = meminfo.as_deref().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map(|kb| kb.saturating_mul(1024))
    });
    let read = |f: &str| -> Option<usize> {
        std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(f))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    };
    let cgroup =
        read("memory.max").map(|max| max.saturating_sub(read("memory.current").unwrap_or(0)));
    match (avail, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// Overlap of the sliding windows (HF `forward_test` hard-codes 0.5; spec §6.8 step 9).
pub const OVERLAP: f64 = 0.5;

/// A prompt in the file's voxel indices `(i, j, k)` (corners inclusive). Any combination of
/// text, box and points; at least one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UserPrompt {
    pub text: Option<String>,
    pub bbox: Option<[usize; 6]>,
    pub points: Vec<[usize; 3]>,
    /// One per point: true positive, false negative.
    pub positive: Vec<bool>,
}

impl UserPrompt {
    /// A short description for messages and reports.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.text {
            parts.push(format!("text {t:?}"));
        }
        if let Some(b) = self.bbox {
            parts.push(format!("box {b:?}"));
        }
        if !self.points.is_empty() {
            parts.push(format!("{} point(s)", self.points.len()));
        }
        parts.join(" + ")
    }
}

/// How to run.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Windows per model call (the largest batch up to this that fits `mem_limit`).
    pub batch: usize,
    /// Run the zoom-in; `false` stops after the zoom-out (`--no-zoom-in`).
    pub zoom_in: bool,
    /// Memory budget for the whole run, in bytes: the device's, and on a host device (cpu,
    /// emu) also the host buffers'. Default: the device's free memory, or on a host device the
    /// machine's available memory ([`host_available_memory`]), less [`MEMORY_MARGIN`].
    pub mem_limit: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            batch: 1,
            zoom_in: true,
            mem_limit: None,
        }
    }
}

/// What the zoom-in did with one window.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowRecord {
    /// `[start, stop)` per axis in the padded ROI.
    pub padded_range: [[usize; 2]; 3],
    /// The box prompt sent with it (window coordinates), if the prompt uses boxes.
    pub bbox: Option<[f32; 6]>,
    /// Points sent with it (window coordinates) and their labels.
    pub points: usize,
}

/// The outcome of one prompt on one volume.
pub struct PromptOutcome {
    pub prompt: UserPrompt,
    /// Final logits on the cropped grid `(d0, h0, w0)` (spec §6.9).
    pub logits: Vec<f32>,
    /// `logits > 0` (= sigmoid > 0.5) on the cropped grid.
    pub mask: Vec<u8>,
    /// Positive voxels.
    pub voxels: usize,
    /// The prompt in the zoom-out frame.
    pub zoom_out_box: Option<BBox>,
    pub zoom_out_points: Vec<[usize; 3]>,
    /// The zoom-out logits (one window), kept for inspection and tests.
    pub zoom_out_logits: Vec<f32>,
    /// The ROI, or `None` when the zoom-out found nothing ("Fail to detect foreground").
    pub roi: Option<Roi>,
    /// The sliding windows, in execution order (empty without zoom-in).
    pub windows: Vec<WindowRecord>,
    /// How many of them reused a session's cached image embedding (no encoder pass).
    pub cached_windows: usize,
    /// The ROI is the session's previous one ([`PromptOptions::keep_roi`]), not this prompt's.
    pub roi_kept: bool,
    pub pad_before: [usize; 3],
    pub zoom_out_seconds: f64,
    pub zoom_in_seconds: f64,
}

/// The outcome of a whole volume.
pub struct VolumeOutcome {
    /// Model-frame dims (D, H, W) = file (Z, Y, X).
    pub dims: [usize; 3],
    /// The model's window (D, H, W): the shape of the zoom-out logits.
    pub window: [usize; 3],
    pub norm: NormStats,
    /// Foreground crop `[start, end)` in (D, H, W).
    pub crop_start: [usize; 3],
    pub crop_end: [usize; 3],
    pub cropped_dims: [usize; 3],
    /// Windows per model call actually used (after fitting the memory budget).
    pub batch: usize,
    pub prompts: Vec<PromptOutcome>,
    pub preprocess_seconds: f64,
    /// Encoding the zoom-out window (shared by all prompts).
    pub zoom_out_encode_seconds: f64,
    /// The model arena the plan reserved before the first launch, and the volume region.
    pub arena_bytes: usize,
    pub volume_region_bytes: usize,
    /// Times the arena had to grow after the plan reserved it: 0 unless the plan is wrong.
    pub arena_growths: usize,
}

impl VolumeOutcome {
    /// Prompt `p`'s binary mask on the original grid, file order (spec §6.9): the cropped mask
    /// placed at the crop, 0 elsewhere.
    pub fn mask(&self, p: usize) -> Vec<u8> {
        self.place(|i| self.prompts[p].mask[i])
    }

    /// A label map: label n (1-based) for the n-th prompt's mask; where masks overlap, the
    /// prompt with the larger logit wins.
    pub fn label_map(&self) -> Vec<u8> {
        self.place(|i| {
            let mut best: Option<(usize, f32)> = None;
            for (n, p) in self.prompts.iter().enumerate() {
                if p.mask[i] != 0 && best.is_none_or(|(_, l)| p.logits[i] > l) {
                    best = Some((n, p.logits[i]));
                }
            }
            best.map_or(0, |(n, _)| (n + 1).min(255) as u8)
        })
    }

    fn place(&self, value: impl Fn(usize) -> u8) -> Vec<u8> {
        let [_, hh, ww] = self.dims;
        let [cd, ch, cw] = self.cropped_dims;
        let mut out = vec![0u8; self.dims.iter().product()];
        for d in 0..cd {
            for h in 0..ch {
                let src = (d * ch + h) * cw;
                let dst = ((d + self.crop_start[0]) * hh + h + self.crop_start[1]) * ww
                    + self.crop_start[2];
                for w in 0..cw {
                    out[dst + w] = value(src + w);
                }
            }
        }
        out
    }
}

/// Progress of the zoom-in: `(windows done, windows in total)`.
pub type Progress<'a> = dyn FnMut(usize, usize) + 'a;

/// Segments one CT volume with every prompt (spec §6). `volume` is the file's voxel buffer in
/// file order, which is the model frame `(D, H, W) = (Z, Y, X)` row-major (spec §6.1); `dims`
/// is `(D, H, W)`. The same as opening a [`Session`] sized for exactly these prompts and
/// segmenting each in turn.
pub fn segment(
    model: &SegVol,
    volume: &[f32],
    dims: [usize; 3],
    prompts: &[UserPrompt],
    opts: &Options,
    progress: &mut Progress<'_>,
) -> Result<VolumeOutcome> {
    if prompts.is_empty() {
        return Err(Error::Prompt(
            "no prompt: give a text, a box or a point".into(),
        ));
    }
    for p in prompts {
        check_prompt(p, dims)?;
    }
    // The real prompts size the arena: nothing grows once the first launch is made.
    let request = plan::Request::for_prompts(prompts, |t| model.token_count(t))?;
    let session = Session::open(model, volume, dims, request, opts)?;
    let mut outcomes = Vec::with_capacity(prompts.len());
    for p in prompts {
        outcomes.push(session.segment(p, progress)?);
    }
    Ok(session.outcome(outcomes))
}

/// One volume opened for prompting (spec §6.1-§6.4 done once): the normalised volume, its
/// foreground crop and the zoom-out window's image embedding stay on the device, so each
/// [`Session::segment`] runs only the prompt's own work (§6.5-§6.9). A prompt's result is the
/// same whatever was prompted before: the session keeps inputs, never results.
///
/// ```
/// use segvol::backend::DeviceSpec;
/// use segvol::model::SegVol;
/// use segvol::pipeline::{plan::Request, Options, PromptOptions, Session, UserPrompt};
///
/// let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
/// let model = SegVol::load(&root.join("tiny/model"), DeviceSpec::parse("cpu", None)?.open()?)?;
/// let vol = segvol::io::nifti::read_volume(&root.join("data/example_ct_sm.nii.gz"))?;
/// let session = Session::open(&model, &vol.data, vol.model_dims(), Request::default(), &Options::default())?;
/// session.set_cache_limit(256 << 20);
///
/// let text = UserPrompt { text: Some("liver".into()), ..Default::default() };
/// let first = session.segment(&text, &mut |_, _| {})?;
/// // The same prompt again: every window's embedding is cached, the bytes are the same.
/// let again = session.segment(&text, &mut |_, _| {})?;
/// assert_eq!(again.cached_windows, again.windows.len());
/// assert_eq!(again.mask, first.mask);
///
/// // A click inside the ROI, refining it (decoder passes only).
/// let click = UserPrompt { points: vec![[60, 50, 15]], positive: vec![true], ..text.clone() };
/// let refined = session.segment_with(&click, PromptOptions { keep_roi: true }, &mut |_, _| {})?;
/// assert!(refined.roi_kept);
///
/// // What does a box hold? Candidates ranked best first.
/// let bbox = UserPrompt { bbox: Some([30, 30, 8, 80, 70, 22]), ..Default::default() };
/// let named = session.identify(&bbox, &["liver".into(), "spleen".into()])?;
/// assert_eq!(named.ranked.len(), 2);
///
/// // Masks on the original grid, in file order, for writing with `io::nifti::write_mask`.
/// let mask = session.outcome(vec![refined]).mask(0);
/// assert_eq!(mask.len(), vol.data.len());
/// # Ok::<(), segvol::Error>(())
/// ```
pub struct Session<'m> {
    model: ModelRef<'m>,
    plan: VolumePlan,
    region: Buffer,
    opts: Options,
    dims: [usize; 3],
    norm: NormStats,
    crop_start: [usize; 3],
    crop_end: [usize; 3],
    cropped_dims: [usize; 3],
    preprocess_seconds: f64,
    zoom_out_encode_seconds: f64,
    /// Arena allocations when the plan's arena was reserved.
    arena_allocations: usize,
    cache: parking_lot::Mutex<EmbeddingCache>,
    /// The ROI of the last prompt that had one ([`PromptOptions::keep_roi`]).
    last_roi: parking_lot::Mutex<Option<Roi>>,
}

/// The model a [`Session`] runs on: borrowed for a one-shot run, or shared so that the session
/// owns its model and can live in a table that outlives any borrow (a server's sessions, a
/// Python object).
enum ModelRef<'m> {
    Borrowed(&'m SegVol),
    Shared(Arc<SegVol>),
}

impl std::ops::Deref for ModelRef<'_> {
    type Target = SegVol;
    fn deref(&self) -> &SegVol {
        match self {
            ModelRef::Borrowed(m) => m,
            ModelRef::Shared(m) => m,
        }
    }
}

impl Session<'static> {
    /// [`Session::open`] on a shared model: the session holds the model alive and borrows
    /// nothing, so it can be kept, sent to another thread and dropped in any order.
    pub fn open_shared(
        model: Arc<SegVol>,
        volume: &[f32],
        dims: [usize; 3],
        request: plan::Request,
        opts: &Options,
    ) -> Result<Self> {
        Self::open_on(ModelRef::Shared(model), volume, dims, request, opts)
    }
}

/// A model loaded once with how to run it, opening [`Session`]s that each own a share of it:
/// the resident engine a server, a Python process or a folder job keeps for its lifetime.
/// Sessions outlive nothing of the engine's; dropping the engine while sessions are open is
/// fine (the last one frees the model).
///
/// ```
/// use segvol::backend::DeviceSpec;
/// use segvol::model::SegVol;
/// use segvol::pipeline::{plan::Request, Engine, Options, UserPrompt};
///
/// let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
/// let model = SegVol::load(&root.join("tiny/model"), DeviceSpec::parse("cpu", None)?.open()?)?;
/// let engine = Engine::new(model, Options::default());
/// let vol = segvol::io::read_input(&root.join("data/example_ct_sm.nii.gz"))?;
/// // A session with room for 256 MiB of zoom-in embeddings, handed to another thread.
/// let request = Request { cache_bytes: 256 << 20, ..Request::default() };
/// let session = engine.open(&vol.data, vol.model_dims(), request)?;
/// let liver = UserPrompt { text: Some("liver".into()), ..UserPrompt::default() };
/// let voxels = std::thread::spawn(move || session.segment(&liver, &mut |_, _| {}).map(|o| o.voxels))
///     .join()
///     .unwrap()?;
/// assert!(voxels > 0);
/// # Ok::<(), segvol::Error>(())
/// ```
pub struct Engine {
    model: Arc<SegVol>,
    opts: Options,
}

impl Engine {
    /// An engine on `model`, running every session with `opts`.
    pub fn new(model: SegVol, opts: Options) -> Self {
        Engine {
            model: Arc::new(model),
            opts,
        }
    }

    /// The model, shared with the sessions.
    pub fn model(&self) -> &Arc<SegVol> {
        &self.model
    }

    /// How sessions run.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Opens `volume` (file order = model frame, `dims` = (D, H, W)) for prompting, with an
    /// embedding cache of `request.cache_bytes` ([`Session::open`]).
    pub fn open(
        &self,
        volume: &[f32],
        dims: [usize; 3],
        request: plan::Request,
    ) -> Result<Session<'static>> {
        Session::open_shared(self.model.clone(), volume, dims, request, &self.opts)
    }

    /// One-shot [`segment`] with the engine's options.
    pub fn segment(
        &self,
        volume: &[f32],
        dims: [usize; 3],
        prompts: &[UserPrompt],
        progress: &mut Progress<'_>,
    ) -> Result<VolumeOutcome> {
        segment(&self.model, volume, dims, prompts, &self.opts, progress)
    }
}

// A server moves sessions between threads and shares them across requests.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<Engine>();
    shared::<Session<'static>>();
};

/// The result of [`Session::identify`].
#[derive(Clone, Debug)]
pub struct Identification {
    /// Voxels of the spatial prompt's mask the scores are taken over.
    pub mask_voxels: usize,
    /// `(name, score, share)`, best first: the mean sigmoid of the text-conditioned logits
    /// inside the mask, and that score over the sum of all candidates' scores.
    pub ranked: Vec<(String, f64, f64)>,
}

/// Mean of `sigmoid(logits)` over the voxels where `mask` is set (f64 sums).
pub fn mean_sigmoid_inside(logits: &[f32], mask: &[u8]) -> f64 {
    let (mut sum, mut n) = (0f64, 0usize);
    for (&l, &m) in logits.iter().zip(mask) {
        if m != 0 {
            sum += 1.0 / (1.0 + (-(l as f64)).exp());
            n += 1;
        }
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Candidate names for [`Session::identify`] when none are given: FLARE22's 13 organs (the
/// official training default, spec §6.10), further TotalSegmentator organs and vessels, and
/// the lesion names of SegVol's lesion datasets.
pub const DEFAULT_CANDIDATES: &[&str] = &[
    // FLARE22, in the official order.
    "liver",
    "right kidney",
    "spleen",
    "pancreas",
    "aorta",
    "inferior vena cava",
    "right adrenal gland",
    "left adrenal gland",
    "gallbladder",
    "esophagus",
    "stomach",
    "duodenum",
    "left kidney",
    // TotalSegmentator organs and vessels (its class names, in words).
    "left lung upper lobe",
    "left lung lower lobe",
    "right lung upper lobe",
    "right lung middle lobe",
    "right lung lower lobe",
    "trachea",
    "thyroid gland",
    "small bowel",
    "colon",
    "urinary bladder",
    "prostate",
    "heart",
    "pulmonary vein",
    "superior vena cava",
    "portal vein and splenic vein",
    "left iliac artery",
    "right iliac artery",
    "left iliac vena",
    "right iliac vena",
    "brachiocephalic trunk",
    "spinal cord",
    "brain",
    "sacrum",
    "sternum",
    // Lesions.
    "liver tumor",
    "kidney tumor",
    "kidney cyst",
    "lung tumor",
    "pancreatic tumor",
    "colon cancer",
];

/// How a session runs one prompt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PromptOptions {
    /// Interactive refinement, a documented departure from the official pipeline: when every
    /// point and the box of the prompt lie inside the previous prompt's ROI, that ROI and its
    /// windows are used instead of the one this prompt's zoom-out would give, so with the
    /// windows cached the prompt costs only decoder passes. Otherwise (or without a previous
    /// ROI) the prompt runs as usual; [`PromptOutcome::roi_kept`] says which happened.
    pub keep_roi: bool,
}

/// Which zoom-in batch an embedding belongs to: the ROI (which fixes the sliding windows and
/// the zero padding around it) and the batch's first window and length. The same key means the
/// same encoder call on the same input bytes, so a hit returns exactly what recomputing would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BatchKey {
    roi_start: [usize; 3],
    roi_shape: [usize; 3],
    first: usize,
    len: usize,
}

/// Zoom-in image embeddings of a session, per batch of windows, least recently used evicted
/// first within `limit` bytes (0: no cache, as for a one-shot `segment`).
#[derive(Default)]
struct EmbeddingCache {
    limit: usize,
    held: usize,
    clock: u64,
    entries: Vec<(BatchKey, Buffer, u64)>,
}

impl EmbeddingCache {
    fn get(&mut self, key: &BatchKey) -> Option<Addr> {
        self.clock += 1;
        let now = self.clock;
        self.entries.iter_mut().find(|e| e.0 == *key).map(|e| {
            e.2 = now;
            e.1.addr()
        })
    }

    /// Room for `bytes` more, evicting the least recently used; false if it can never fit.
    fn make_room(&mut self, bytes: usize) -> bool {
        if bytes > self.limit {
            return false;
        }
        while self.held + bytes > self.limit {
            let Some(oldest) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].2) else {
                break;
            };
            let (_, buf, _) = self.entries.swap_remove(oldest);
            self.held -= buf.len();
        }
        true
    }

    fn insert(&mut self, key: BatchKey, buf: Buffer) {
        self.clock += 1;
        self.held += buf.len();
        self.entries.push((key, buf, self.clock));
    }
}

impl<'m> Session<'m> {
    /// Uploads, normalises and crops `volume` (model-frame `dims`), and encodes its zoom-out
    /// window, all in one region laid out by the plan of `request` (whose prompts size the
    /// arena; a later prompt larger than those grows it once). The embedding cache starts at
    /// `request.cache_bytes`, which the plan counts against the budget.
    pub fn open(
        model: &'m SegVol,
        volume: &[f32],
        dims: [usize; 3],
        request: plan::Request,
        opts: &Options,
    ) -> Result<Self> {
        Self::open_on(ModelRef::Borrowed(model), volume, dims, request, opts)
    }

    fn open_on(
        model: ModelRef<'m>,
        volume: &[f32],
        dims: [usize; 3],
        request: plan::Request,
        opts: &Options,
    ) -> Result<Self> {
        let turn = model.exclusive();
        let b = model.backend().as_ref();
        let cfg = model.config();
        let window = cfg.spatial_size;
        if volume.len() != dims.iter().product::<usize>() || dims.contains(&0) {
            return Err(Error::Input(format!(
                "a volume of {} voxels does not match dims {dims:?}",
                volume.len()
            )));
        }
        // Every buffer of the run, known before the first launch, in one allocation. Without a
        // budget, a device that reports its free memory is held to it (less a margin),
        // counting what the model already holds. A host backend (no free-memory report: cpu,
        // emu) is held to the machine's available memory (MemAvailable, or the cgroup's limit
        // if lower), and there the host buffers of the run count against the same budget.
        let host_device = b.free_memory().is_none();
        let held = model.weights().device_bytes + model.arena_bytes();
        let limit = opts.mem_limit.or_else(|| {
            b.free_memory()
                .or_else(|| {
                    if host_device {
                        host_available_memory()
                    } else {
                        None
                    }
                })
                .map(|free| (free + held).saturating_sub(MEMORY_MARGIN))
        });
        let request = plan::Request {
            shares_budget: host_device,
            ..request
        };
        let batch = if opts.zoom_in { opts.batch } else { 1 };
        let plan = VolumePlan::fit(cfg, b.dtype(), dims, batch, limit, request)?;
        model.reserve_arena(plan.call.arena_bytes)?;
        let arena_allocations = model.runtime_stats().arena_allocations;
        let region = b.alloc(plan.volume_bytes)?;
        let at = |x: Buf| region.at(plan.offset(x));

        let t0 = Instant::now();
        let r = range(b, "preprocess");
        // SAFETY (all device calls below): every address is a buffer of `region` laid out by
        // the plan for a volume of these dims, whose sizes bound every extent used.
        let (norm, crop_start, crop_end) = unsafe {
            b.upload(at(Buf::Volume), bytemuck::cast_slice(volume))?;
            let norm = preprocess::normalize_on_device(b, at(Buf::Volume), dims)?;
            let (s, e) = preprocess::foreground_box_on_device(b, at(Buf::Volume), dims)?;
            preprocess::crop_on_device(b, at(Buf::Volume), dims, s, e, at(Buf::Cropped))?;
            (norm, s, e)
        };
        let cropped_dims = [0, 1, 2].map(|a| crop_end[a] - crop_start[a]);
        b.synchronize()?;
        drop(r);
        let preprocess_seconds = t0.elapsed().as_secs_f64();

        // §6.4: the zoom-out window, encoded once for every prompt.
        let t0 = Instant::now();
        let r = range(b, "zoom-out encode");
        unsafe {
            preprocess::resize_on_device(
                b,
                at(Buf::Cropped),
                cropped_dims,
                at(Buf::WindowBatch),
                window,
                InterpMode::NearestExact,
            )?;
        }
        model.encode_into(at(Buf::WindowBatch), 1, at(Buf::ZoomOutEmbedding))?;
        b.synchronize()?;
        drop(r);
        let zoom_out_encode_seconds = t0.elapsed().as_secs_f64();
        drop(turn);
        Ok(Session {
            model,
            plan,
            region,
            opts: *opts,
            dims,
            norm,
            crop_start,
            crop_end,
            cropped_dims,
            preprocess_seconds,
            zoom_out_encode_seconds,
            arena_allocations,
            cache: parking_lot::Mutex::new(EmbeddingCache {
                limit: request.cache_bytes,
                ..Default::default()
            }),
            last_roi: Default::default(),
        })
    }

    /// Keeps zoom-in image embeddings of up to `bytes` (device memory beyond the plan), so a
    /// prompt whose ROI was seen before skips those encoder passes. Results stay bit-identical:
    /// an embedding is reused only for the same windows in the same batch.
    pub fn set_cache_limit(&self, bytes: usize) {
        let mut c = self.cache.lock();
        c.limit = bytes;
        c.make_room(0);
    }

    /// Bytes of cached embeddings held now.
    pub fn cache_bytes(&self) -> usize {
        self.cache.lock().held
    }

    /// Model-frame dims (D, H, W) of the volume.
    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    /// The plan the session runs in (region, arena, window batch).
    pub fn plan(&self) -> &VolumePlan {
        &self.plan
    }

    /// One prompt on the opened volume (spec §6.5-§6.9).
    pub fn segment(&self, p: &UserPrompt, progress: &mut Progress<'_>) -> Result<PromptOutcome> {
        self.segment_with(p, PromptOptions::default(), progress)
    }

    /// [`Session::segment`] with options (interactive refinement).
    pub fn segment_with(
        &self,
        p: &UserPrompt,
        popts: PromptOptions,
        progress: &mut Progress<'_>,
    ) -> Result<PromptOutcome> {
        check_prompt(p, self.dims)?;
        self.segment_prompt(p, popts, progress)
    }

    /// Names what a spatial prompt (a box and/or points, no text) segments, after SegVol's
    /// case study "identifying spatial-prompt segmentation": the spatial prompt runs alone
    /// and gives the mask `M`; then for each candidate name `c` the same spatial prompt with
    /// the text `c` runs inside the spatial prompt's ROI ([`PromptOptions::keep_roi`]: with
    /// the session's cache, decoder passes only), and
    ///
    /// `score(c) = mean over voxels v of M of sigmoid(logits_c(v))`,
    ///
    /// the text-conditioned model's mean confidence inside what the spatial prompt found.
    /// Returned best first, each with its score and its share `score(c) / sum of scores`.
    pub fn identify(&self, spatial: &UserPrompt, candidates: &[String]) -> Result<Identification> {
        if spatial.text.is_some() {
            return Err(Error::Prompt(
                "identify takes a spatial prompt (a box or points) without text".into(),
            ));
        }
        if candidates.is_empty() {
            return Err(Error::Prompt(
                "identify needs at least one candidate name".into(),
            ));
        }
        let base = self.segment(spatial, &mut |_, _| {})?;
        if base.voxels == 0 {
            return Err(Error::Prompt(
                "the spatial prompt segments nothing: there is nothing to name".into(),
            ));
        }
        let mut scores = Vec::with_capacity(candidates.len());
        let keep = PromptOptions { keep_roi: true };
        for c in candidates {
            // Each candidate inside the spatial prompt's own ROI.
            *self.last_roi.lock() = base.roi;
            let p = UserPrompt {
                text: Some(c.clone()),
                ..spatial.clone()
            };
            let out = self.segment_with(&p, keep, &mut |_, _| {})?;
            scores.push((c.clone(), mean_sigmoid_inside(&out.logits, &base.mask)));
        }
        let total: f64 = scores.iter().map(|s| s.1).sum();
        let mut ranked: Vec<(String, f64, f64)> = scores
            .into_iter()
            .map(|(c, s)| (c, s, if total > 0.0 { s / total } else { 0.0 }))
            .collect();
        // Stable: equal scores keep the candidates' order.
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(Identification {
            mask_voxels: base.voxels,
            ranked,
        })
    }

    /// Whether every point and the box of `p` lie inside `roi` (cropped grid).
    fn inside_roi(&self, p: &UserPrompt, roi: &Roi) -> bool {
        let end = roi.end();
        let inside = |ijk: [usize; 3]| {
            self.to_cropped(ijk)
                .is_some_and(|c| (0..3).all(|a| c[a] >= roi.start[a] && c[a] < end[a]))
        };
        p.points.iter().all(|&q| inside(q))
            && p.bbox
                .is_none_or(|b| inside([b[0], b[1], b[2]]) && inside([b[3], b[4], b[5]]))
    }

    /// The volume's outcome with the given prompts' outcomes.
    pub fn outcome(&self, prompts: Vec<PromptOutcome>) -> VolumeOutcome {
        VolumeOutcome {
            dims: self.dims,
            window: self.model.config().spatial_size,
            norm: self.norm,
            crop_start: self.crop_start,
            crop_end: self.crop_end,
            cropped_dims: self.cropped_dims,
            batch: self.plan.batch,
            prompts,
            preprocess_seconds: self.preprocess_seconds,
            zoom_out_encode_seconds: self.zoom_out_encode_seconds,
            arena_bytes: self.model.arena_bytes(),
            volume_region_bytes: self.plan.volume_bytes,
            arena_growths: self.model.runtime_stats().arena_allocations - self.arena_allocations,
        }
    }

    fn at(&self, x: Buf) -> Addr {
        self.region.at(self.plan.offset(x))
    }
    /// File `(i, j, k)` to the cropped grid's `(d, h, w)` (spec §6.1 swap, minus the crop).
    fn to_cropped(&self, ijk: [usize; 3]) -> Option<[usize; 3]> {
        let dhw = [ijk[2], ijk[1], ijk[0]];
        let c: Vec<usize> = (0..3)
            .map(|a| {
                dhw[a]
                    .checked_sub(self.crop_start[a])
                    .filter(|&v| v < self.cropped_dims[a])
            })
            .collect::<Option<_>>()?;
        Some([c[0], c[1], c[2]])
    }

    /// §6.5: the user's box and points in the zoom-out frame.
    fn map_prompt(&self, p: &UserPrompt) -> Result<(Option<BBox>, Vec<[usize; 3]>)> {
        let window = self.model.config().spatial_size;
        let zbox = match p.bbox {
            None => None,
            Some(bx) => {
                // The box in the cropped grid, clipped to the foreground crop.
                let lo = [bx[2], bx[1], bx[0]];
                let hi = [bx[5], bx[4], bx[3]];
                let mut c = [0usize; 6];
                for a in 0..3 {
                    let (s, n) = (self.crop_start[a], self.cropped_dims[a]);
                    if hi[a] < s || lo[a] >= s + n {
                        return Err(Error::Prompt(format!(
                            "box {bx:?} lies outside the volume's foreground (the crop of spec §6.3)"
                        )));
                    }
                    c[a] = lo[a].max(s) - s;
                    c[a + 3] = hi[a].min(s + n - 1) - s;
                }
                Some(geometry::box_zoom_out_dhw(c, self.cropped_dims, window)?)
            }
        };
        let mut pts = Vec::with_capacity(p.points.len());
        for q in &p.points {
            let c = self.to_cropped(*q).ok_or_else(|| {
                Error::Prompt(format!(
                    "point {q:?} lies outside the volume's foreground (the crop of spec §6.3)"
                ))
            })?;
            pts.push(geometry::point_zoom_out_dhw(c, self.cropped_dims, window)?);
        }
        Ok((zbox, pts))
    }

    fn segment_prompt(
        &self,
        p: &UserPrompt,
        popts: PromptOptions,
        progress: &mut Progress<'_>,
    ) -> Result<PromptOutcome> {
        let model: &SegVol = &self.model;
        let _turn = model.exclusive();
        let b = model.backend().as_ref();
        let cfg = model.config();
        let window = cfg.spatial_size;
        let win_n: usize = window.iter().product();
        let cd = self.cropped_dims;
        let n_cropped: usize = cd.iter().product();

        // §6.5–§6.6: the zoom-out call and its logits back on the cropped grid.
        let t0 = Instant::now();
        let r = range(b, "zoom-out");
        let (zoom_box, zoom_points) = self.map_prompt(p)?;
        let labels: Vec<f32> = p
            .positive
            .iter()
            .map(|&v| if v { 1.0 } else { 0.0 })
            .collect();
        let zp = WindowPrompt {
            text: p.text.clone(),
            bbox: zoom_box.map(|bx| bx.map(|v| v as f32)),
            points: zoom_points.iter().map(|q| q.map(|v| v as f32)).collect(),
            labels: labels.clone(),
        };
        model.decode(
            self.at(Buf::ZoomOutEmbedding),
            std::slice::from_ref(&zp),
            self.at(Buf::WindowLogits),
        )?;
        let mut zoom_out_logits = vec![0f32; win_n];
        unsafe {
            b.download(
                self.at(Buf::WindowLogits),
                bytemuck::cast_slice_mut(&mut zoom_out_logits),
            )?;
            check_finite(b, &zoom_out_logits, "zoom-out", p)?;
            preprocess::resize_on_device(
                b,
                self.at(Buf::WindowLogits),
                window,
                self.at(Buf::Global),
                cd,
                InterpMode::Nearest,
            )?;
        }
        // §6.7: the ROI from `L_global > 0`, or the previous one for a refinement inside it.
        let kept = if popts.keep_roi {
            (*self.last_roi.lock()).filter(|r| self.inside_roi(p, r))
        } else {
            None
        };
        let roi = match kept {
            Some(r) => Some(r),
            None => {
                let pred = unsafe { b.bbox_above(self.at(Buf::Global), cd, [0; 3], cd, 0.0)? };
                geometry::roi_bounds(pred, cd, window)
            }
        };
        if roi.is_some() {
            *self.last_roi.lock() = roi;
        }
        b.synchronize()?;
        drop(r);
        let zoom_out_seconds = t0.elapsed().as_secs_f64();

        let t0 = Instant::now();
        let r = range(b, "zoom-in");
        let mut windows = Vec::new();
        let mut cached_windows = 0;
        let mut pad_before = [0; 3];
        if let (Some(roi), true) = (roi, self.opts.zoom_in) {
            let sw = SlidingWindows::new(roi.shape, window, OVERLAP)?;
            pad_before = sw.pad_before;
            (windows, cached_windows) = self.zoom_in(p, &roi, &sw, zoom_box, &labels, progress)?;
        }
        b.synchronize()?;
        drop(r);
        let zoom_in_seconds = t0.elapsed().as_secs_f64();

        // §6.9: the mask, logit > 0 (= sigmoid > 0.5).
        let mut logits = vec![0f32; n_cropped];
        let mut mask = vec![0u8; n_cropped];
        unsafe {
            b.threshold_u8(self.at(Buf::Global), self.at(Buf::Mask), n_cropped, 0.0)?;
            b.download(self.at(Buf::Global), bytemuck::cast_slice_mut(&mut logits))?;
            b.download(self.at(Buf::Mask), &mut mask)?;
        }
        // The zoom-in windows' logits are blended into these inside the ROI, the only place
        // they count.
        check_finite(b, &logits, "zoom-in", p)?;
        let voxels = mask.iter().filter(|&&m| m != 0).count();
        Ok(PromptOutcome {
            prompt: p.clone(),
            logits,
            mask,
            voxels,
            zoom_out_box: zoom_box,
            zoom_out_points: zoom_points,
            zoom_out_logits,
            roi,
            windows,
            cached_windows,
            roi_kept: kept.is_some(),
            pad_before,
            zoom_out_seconds,
            zoom_in_seconds,
        })
    }

    /// §6.8: the sliding windows over the ROI (batched), constant blending, back-fill.
    fn zoom_in(
        &self,
        p: &UserPrompt,
        roi: &Roi,
        sw: &SlidingWindows,
        zoom_box: Option<BBox>,
        labels: &[f32],
        progress: &mut Progress<'_>,
    ) -> Result<(Vec<WindowRecord>, usize)> {
        let mut cached_windows = 0;
        let model: &SegVol = &self.model;
        let b = model.backend().as_ref();
        let window = model.config().spatial_size;
        let win_n: usize = window.iter().product();
        let cd = self.cropped_dims;
        let padded_n: usize = sw.padded.iter().product();
        let use_box = p.bbox.is_some() || !p.points.is_empty();
        // The user's points on the cropped grid (they were checked to lie in the crop).
        let user_points: Vec<[usize; 3]> = p
            .points
            .iter()
            .filter_map(|q| self.to_cropped(*q))
            .collect();
        let mut prediction = |start: [usize; 3], extent: [usize; 3]| -> Result<Option<BBox>> {
            // SAFETY: `Global` holds the cropped grid; the window box lies inside it.
            unsafe { b.bbox_above(self.at(Buf::Global), cd, start, extent, 0.0) }
        };
        unsafe {
            preprocess::crop_on_device(
                b,
                self.at(Buf::Cropped),
                cd,
                roi.start,
                roi.end(),
                self.at(Buf::Roi),
            )?;
            b.fill(self.at(Buf::Accumulator), padded_n, 0.0)?;
            b.fill(self.at(Buf::Counts), padded_n, 0.0)?;
        }
        let mut records = Vec::with_capacity(sw.len());
        let total = sw.len();
        let emb_bytes = model.embedding_bytes();
        for chunk in (0..total).collect::<Vec<_>>().chunks(self.plan.batch) {
            let _r = range(
                b,
                &format!("window batch {}..{}", chunk[0], chunk[0] + chunk.len()),
            );
            let key = BatchKey {
                roi_start: roi.start,
                roi_shape: roi.shape,
                first: chunk[0],
                len: chunk.len(),
            };
            let cached = self.cache.lock().get(&key);
            let mut prompts = Vec::with_capacity(chunk.len());
            for (slot, &i) in chunk.iter().enumerate() {
                let start = sw.windows[i].start;
                // Window i of the zero-padded ROI into the batch (spec §6.8 steps 1 and 6).
                let args = CopyBoxArgs {
                    src: self.at(Buf::Roi),
                    src_dims: roi.shape,
                    src_start: [0, 1, 2].map(|a| start[a] as i64 - sw.pad_before[a] as i64),
                    dst: self.at(Buf::WindowBatch) + (slot * win_n * 4) as u64,
                    dst_dtype: DType::F32,
                    dst_dims: window,
                    dst_start: [0; 3],
                    extent: window,
                    pad: 0.0,
                };
                if cached.is_none() {
                    unsafe { b.copy_box(&args)? };
                }
                // The window's prompts (spec §6.8 step 5).
                let bbox = if use_box {
                    let single = if p.bbox.is_some() {
                        zoom_box.map(|z| (z, window))
                    } else {
                        None
                    };
                    Some(geometry::box_prompt(sw.window_box(
                        i,
                        roi,
                        cd,
                        single,
                        &mut prediction,
                    )?))
                } else {
                    None
                };
                let mut points = Vec::new();
                let mut point_labels = Vec::new();
                for (q, &l) in user_points.iter().zip(labels) {
                    let w: Vec<i64> = (0..3)
                        .map(|a| {
                            q[a] as i64 - roi.start[a] as i64 + sw.pad_before[a] as i64
                                - start[a] as i64
                        })
                        .collect();
                    if (0..3).all(|a| w[a] >= 0 && (w[a] as usize) < window[a]) {
                        points.push([w[0] as f32, w[1] as f32, w[2] as f32]);
                        point_labels.push(l);
                    }
                }
                records.push(WindowRecord {
                    padded_range: sw.padded_range(i),
                    bbox,
                    points: points.len(),
                });
                prompts.push(WindowPrompt {
                    text: p.text.clone(),
                    bbox,
                    points,
                    labels: point_labels,
                });
            }
            let n = chunk.len();
            let embeddings = match cached {
                Some(addr) => {
                    cached_windows += n;
                    addr
                }
                None => {
                    let mut cache = self.cache.lock();
                    if cache.make_room(n * emb_bytes) {
                        let buf = b.alloc(n * emb_bytes)?;
                        model.encode_into(self.at(Buf::WindowBatch), n, buf.addr())?;
                        let addr = buf.addr();
                        cache.insert(key, buf);
                        addr
                    } else {
                        let out = self.at(Buf::WindowEmbeddings);
                        model.encode_into(self.at(Buf::WindowBatch), n, out)?;
                        out
                    }
                }
            };
            model.decode(embeddings, &prompts, self.at(Buf::WindowLogits))?;
            for (slot, &i) in chunk.iter().enumerate() {
                let args = AccumulateArgs {
                    win: self.at(Buf::WindowLogits) + (slot * win_n * 4) as u64,
                    window,
                    acc: self.at(Buf::Accumulator),
                    cnt: self.at(Buf::Counts),
                    dims: sw.padded,
                    start: sw.windows[i].start,
                };
                unsafe { b.accumulate_window(&args)? };
            }
            progress(records.len(), total);
        }
        // Constant blending (step 7), then the ROI overwrites L_global (step 8).
        unsafe {
            b.divide_counts(
                self.at(Buf::Accumulator),
                self.at(Buf::Counts),
                self.at(Buf::Accumulator),
                padded_n,
            )?;
            let args = CopyBoxArgs {
                src: self.at(Buf::Accumulator),
                src_dims: sw.padded,
                src_start: sw.pad_before.map(|v| v as i64),
                dst: self.at(Buf::Global),
                dst_dtype: DType::F32,
                dst_dims: cd,
                dst_start: roi.start,
                extent: roi.shape,
                pad: 0.0,
            };
            b.copy_box(&args)?;
        }
        Ok((records, cached_windows))
    }
}

/// A prompt must lie inside the volume; boxes are `[i0,j0,k0,i1,j1,k1]` with min <= max.
fn check_prompt(p: &UserPrompt, dims: [usize; 3]) -> Result<()> {
    let xyz = [dims[2], dims[1], dims[0]];
    if p.text.is_none() && p.bbox.is_none() && p.points.is_empty() {
        return Err(Error::Prompt(
            "an empty prompt: give a text, a box or points".into(),
        ));
    }
    if p.points.len() != p.positive.len() {
        return Err(Error::Prompt(format!(
            "{} points but {} labels",
            p.points.len(),
            p.positive.len()
        )));
    }
    if let Some(bx) = p.bbox {
        for a in 0..3 {
            if bx[a] > bx[a + 3] {
                return Err(Error::Prompt(format!(
                    "box {bx:?}: min exceeds max on axis {a}"
                )));
            }
            if bx[a + 3] >= xyz[a] {
                return Err(Error::Prompt(format!(
                    "box {bx:?} lies outside the volume of {}x{}x{} voxels (i,j,k)",
                    xyz[0], xyz[1], xyz[2]
                )));
            }
        }
    }
    for q in &p.points {
        if (0..3).any(|a| q[a] >= xyz[a]) {
            return Err(Error::Prompt(format!(
                "point {q:?} lies outside the volume of {}x{}x{} voxels (i,j,k)",
                xyz[0], xyz[1], xyz[2]
            )));
        }
    }
    Ok(())
}

/// Refuses non-finite logits: the weights were checked finite at load and the input volume is
/// finite after normalisation, so NaN or infinity here means the model overflowed f32 (huge
/// weights) or the device failed; either way the mask would be silently empty. Exit 1.
fn check_finite(b: &dyn Backend, logits: &[f32], stage: &str, p: &UserPrompt) -> Result<()> {
    if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
        let what = p
            .text
            .as_deref()
            .map_or_else(|| "box/points".to_string(), crate::error::clip);
        return Err(Error::device(
            b.name(),
            format!(
                "the {stage} logits of prompt {what:?} are not finite ({} at element {i}): \
                 the model overflowed f32 (weights too large?) or the device failed",
                logits[i]
            ),
        ));
    }
    Ok(())
}
