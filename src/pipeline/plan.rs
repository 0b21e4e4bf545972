//! The whole-volume memory plan (DESIGN.md, "Program and memory plan"): every buffer of one
//! zoom-out-zoom-in run, known before the first launch, packed by lifetime into one region, plus
//! the model's weights and arena; and the window batch size that fits a memory budget. Sizes
//! are for the worst case of a volume of the given shape: the foreground crop and the ROI both
//! cover the whole volume.

use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::CallPlan;
use crate::program::planner::pack;

/// Pipeline stages, in order: the lifetimes of the volume buffers are ranges of these.
pub const STAGES: [&str; 6] = [
    "upload+normalise",
    "crop",
    "zoom-out",
    "roi",
    "zoom-in",
    "back-fill+threshold",
];

/// The volume buffers of a run, in the order of [`VolumePlan::buffers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buf {
    /// The uploaded CT, normalised in place.
    Volume,
    /// The foreground crop `I_c`.
    Cropped,
    /// `L_global`: the zoom-out logits on the cropped grid, then the final logits.
    Global,
    /// The zoom-out window's image tokens, reused by every prompt.
    ZoomOutEmbedding,
    /// The ROI of the cropped volume (zoom-in input).
    Roi,
    /// Model input windows `(B, 1, D, H, W)` f32.
    WindowBatch,
    /// Model output logits `(B, 1, D, H, W)` f32.
    WindowLogits,
    /// Image tokens of the window batch.
    WindowEmbeddings,
    /// Sliding-window sums over the padded ROI.
    Accumulator,
    /// Sliding-window counts over the padded ROI.
    Counts,
    /// The u8 mask on the cropped grid.
    Mask,
}

impl Buf {
    pub const ALL: [Buf; 11] = [
        Buf::Volume,
        Buf::Cropped,
        Buf::Global,
        Buf::ZoomOutEmbedding,
        Buf::Roi,
        Buf::WindowBatch,
        Buf::WindowLogits,
        Buf::WindowEmbeddings,
        Buf::Accumulator,
        Buf::Counts,
        Buf::Mask,
    ];

    /// What the plan table calls it.
    pub fn name(self) -> &'static str {
        match self {
            Buf::Volume => "volume (raw, normalised in place)",
            Buf::Cropped => "cropped volume",
            Buf::Global => "global logits (cropped grid)",
            Buf::ZoomOutEmbedding => "zoom-out image embedding",
            Buf::Roi => "ROI volume",
            Buf::WindowBatch => "window batch",
            Buf::WindowLogits => "window logits",
            Buf::WindowEmbeddings => "window image embeddings",
            Buf::Accumulator => "sliding-window accumulator",
            Buf::Counts => "sliding-window counts",
            Buf::Mask => "mask (u8)",
        }
    }
}

/// One volume buffer.
#[derive(Clone, Debug)]
pub struct VolumeBuffer {
    pub name: &'static str,
    pub bytes: usize,
    /// First and last stage that use it (indices into [`STAGES`]).
    pub first: usize,
    pub last: usize,
    /// Offset in the volume region.
    pub offset: usize,
}

/// The most windows per model call a command accepts (`--batch`): larger values are refused up
/// front, whatever the budget (a batch is then clamped to the windows a volume has and to what
/// the budget allows).
pub const MAX_BATCH: usize = 1024;

/// Checks a `--batch` value: at least 1 and at most [`MAX_BATCH`].
pub fn check_batch(batch: usize) -> Result<()> {
    if batch == 0 {
        return Err(Error::Usage(
            "batch 0: a model call takes at least 1 window".into(),
        ));
    }
    if batch > MAX_BATCH {
        return Err(Error::Usage(format!(
            "batch {batch}: at most {MAX_BATCH} windows per model call"
        )));
    }
    Ok(())
}

/// What a plan must know of the request beyond the volume's dims: how many prompts keep
/// host buffers, and the largest prompt the model will see, which sizes the arena. Sized from
/// the real prompts ([`Request::for_prompts`]), the arena is fixed before the first launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Prompts of the volume: each keeps its logits and mask on the host until the write.
    pub prompts: usize,
    /// The device's memory is the host's (cpu, emu): the device region, weights and arena and
    /// these host buffers share one budget.
    pub shares_budget: bool,
    /// The most sparse tokens of any decoder call (points, pad point, box corners, text).
    pub sparse_tokens: usize,
    /// The longest tokenized text (0: no text prompt).
    pub text_tokens: usize,
    /// Device bytes a session keeps for zoom-in image embeddings (0 for a one-shot run).
    pub cache_bytes: usize,
}

impl Default for Request {
    /// When the prompts are not known (`segvol plan` without prompt flags): one prompt with a
    /// box and a text of the template's typical length.
    fn default() -> Self {
        Request {
            prompts: 1,
            shares_budget: false,
            sparse_tokens: PLAN_SPARSE,
            text_tokens: PLAN_TEXT_LEN,
            cache_bytes: 0,
        }
    }
}

impl Request {
    /// The request of `prompts`, with `token_count` giving a text's tokenized length
    /// (`shares_budget` is the device's to say: [`super::Session::open`] sets it).
    /// Sparse tokens bound every call of the pipeline (spec §2.2-§2.4, §6.5): a prompt's
    /// points (the zoom-in sends a subset), two box corners (the zoom-in adds the window's
    /// box; without a box the single pad point is fewer), one text token.
    pub fn for_prompts(
        prompts: &[super::UserPrompt],
        mut token_count: impl FnMut(&str) -> Result<usize>,
    ) -> Result<Self> {
        let mut sparse_tokens = 1;
        let mut text_tokens = 0;
        for p in prompts {
            sparse_tokens = sparse_tokens.max(p.points.len() + 2 + p.text.is_some() as usize);
            if let Some(t) = &p.text {
                text_tokens = text_tokens.max(token_count(t)?);
            }
        }
        Ok(Request {
            prompts: prompts.len().max(1),
            shares_budget: false,
            sparse_tokens,
            text_tokens,
            cache_bytes: 0,
        })
    }
}

/// One host buffer of the plan.
#[derive(Clone, Debug)]
pub struct HostBuffer {
    pub name: &'static str,
    pub bytes: usize,
}

/// The memory plan of a whole-volume run.
pub struct VolumePlan {
    /// Model-frame dims (D, H, W) = file (Z, Y, X).
    pub dims: [usize; 3],
    pub batch: usize,
    pub dtype: DType,
    /// The model call at this batch size (weights, arena, call buffers).
    pub call: CallPlan,
    pub buffers: Vec<VolumeBuffer>,
    /// The packed volume region.
    pub volume_bytes: usize,
    /// The host buffers (the read volume, per-prompt logits and masks, the output).
    pub host: Vec<HostBuffer>,
    pub host_bytes: usize,
    pub request: Request,
}

/// Prompt shape assumed for planning: a box and a text of the template's typical length.
const PLAN_SPARSE: usize = 3;
const PLAN_TEXT_LEN: usize = 16;

/// Every size of a plan stays below this (2^56 bytes = 64 PiB), so that packing, sums and
/// alignment can never wrap; a shape that needs more is refused.
const MAX_PLAN_BYTES: usize = 1 << 56;

/// Checked products and sums for plan sizes: an overflow is a typed error naming the volume.
struct Sizes([usize; 3]);

impl Sizes {
    fn err(&self) -> Error {
        let [d, h, w] = self.0;
        Error::OutOfMemory(format!(
            "a {w}x{h}x{d} volume (i,j,k) is too large to plan: its buffers exceed {}",
            human(MAX_PLAN_BYTES)
        ))
    }
    fn mul(&self, v: &[usize]) -> Result<usize> {
        v.iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .filter(|&n| n <= MAX_PLAN_BYTES)
            .ok_or_else(|| self.err())
    }
    fn sum(&self, v: &[usize]) -> Result<usize> {
        v.iter()
            .try_fold(0usize, |a, &b| a.checked_add(b))
            .filter(|&n| n <= MAX_PLAN_BYTES)
            .ok_or_else(|| self.err())
    }
}

impl VolumePlan {
    /// Plans a volume of model-frame dims (D, H, W) with windows in batches of `batch`, one
    /// prompt, the device apart from the host.
    pub fn new(cfg: &ModelConfig, dtype: DType, dims: [usize; 3], batch: usize) -> Result<Self> {
        Self::with_host(cfg, dtype, dims, batch, Request::default())
    }

    /// [`VolumePlan::new`] with `host` prompts and budget sharing.
    pub fn with_host(
        cfg: &ModelConfig,
        dtype: DType,
        dims: [usize; 3],
        batch: usize,
        host: Request,
    ) -> Result<Self> {
        check_batch(batch)?;
        let sz = Sizes(dims);
        let n = sz.mul(&dims)?;
        let win = cfg.window_voxels();
        let padded = sz.mul(&[0, 1, 2].map(|a| dims[a].max(cfg.spatial_size[a])))?;
        let emb = sz.mul(&[cfg.num_tokens(), cfg.decoder.dim, dtype.size()])?;
        let f = 4;
        let n4 = sz.mul(&[n, f])?;
        let mut specs = Vec::with_capacity(Buf::ALL.len());
        for b in Buf::ALL {
            let (bytes, first, last) = match b {
                Buf::Volume => (n4, 0, 1),
                // Every prompt's zoom-in reads it (stages 2..5 repeat per prompt).
                Buf::Cropped => (n4, 1, 5),
                Buf::Global => (n4, 2, 5),
                Buf::ZoomOutEmbedding => (emb, 2, 5),
                Buf::Roi => (n4, 3, 4),
                Buf::WindowBatch => (sz.mul(&[batch, win, f])?, 2, 4),
                Buf::WindowLogits => (sz.mul(&[batch, win, f])?, 2, 4),
                Buf::WindowEmbeddings => (sz.mul(&[batch, emb])?, 3, 4),
                Buf::Accumulator => (sz.mul(&[padded, f])?, 4, 5),
                Buf::Counts => (sz.mul(&[padded, f])?, 4, 5),
                Buf::Mask => (n, 5, 5),
            };
            specs.push((b.name(), bytes, first, last));
        }
        // Bounds the packed region (at most the sum plus alignment) before packing.
        sz.sum(&specs.iter().map(|s| s.1).collect::<Vec<_>>())?;
        let (offsets, volume_bytes) =
            pack(&specs.iter().map(|s| (s.1, s.2, s.3)).collect::<Vec<_>>());
        let buffers = specs
            .iter()
            .zip(offsets)
            .map(|(&(name, bytes, first, last), offset)| VolumeBuffer {
                name,
                bytes,
                first,
                last,
                offset,
            })
            .collect();
        // Host side (worst case: the crop is the whole volume): the f32 volume as read; per
        // prompt the final logits (f32) and mask (u8) on the cropped grid and the zoom-out
        // logits (one window), kept until the write; the output mask or label map on the
        // original grid (u8) and its encoded file (header + voxels, and the gzip buffer).
        let p = host.prompts.max(1);
        let per_prompt = sz.sum(&[n4, n, sz.mul(&[win, f])?])?;
        let host_bufs = vec![
            HostBuffer {
                name: "volume as read (f32)",
                bytes: n4,
            },
            HostBuffer {
                name: "per-prompt logits, masks, zoom-out logits",
                bytes: sz.mul(&[p, per_prompt])?,
            },
            HostBuffer {
                name: "output mask or label map (u8)",
                bytes: n,
            },
            HostBuffer {
                name: "output file (header + voxels, gzip)",
                bytes: sz.sum(&[n, n, 1 << 20])?,
            },
        ];
        let host_bytes = sz.sum(&host_bufs.iter().map(|h| h.bytes).collect::<Vec<_>>())?;
        let call = CallPlan::new(cfg, dtype, batch, host.sparse_tokens, host.text_tokens)?;
        let plan = VolumePlan {
            dims,
            batch,
            dtype,
            call,
            buffers,
            volume_bytes,
            host: host_bufs,
            host_bytes,
            request: host,
        };
        sz.sum(&[plan.total_bytes(), plan.host_bytes])?;
        Ok(plan)
    }

    /// The zoom-in windows of a volume of these dims in the worst case (ROI = whole volume):
    /// no batch needs to be larger.
    /// Counted per axis as `SlidingWindows` lays them out (MONAI's dense patch slices), without
    /// listing them; saturating.
    pub fn max_windows(cfg: &ModelConfig, dims: [usize; 3]) -> usize {
        (0..3)
            .map(|a| {
                let w = cfg.spatial_size[a].max(1);
                let padded = dims[a].max(w);
                let interval = if padded == w {
                    w
                } else {
                    ((w as f64 * (1.0 - super::OVERLAP)) as usize).max(1)
                };
                (padded - w).div_ceil(interval) + 1
            })
            .fold(1usize, |a, c| a.saturating_mul(c))
    }

    /// The largest batch in `1..=max_batch`, and no more than the volume's windows, whose plan
    /// fits `limit` bytes (no limit: that batch). `max_batch` must pass [`check_batch`].
    /// Refuses up front when even batch 1 does not fit.
    pub fn fit(
        cfg: &ModelConfig,
        dtype: DType,
        dims: [usize; 3],
        max_batch: usize,
        limit: Option<usize>,
        host: Request,
    ) -> Result<Self> {
        check_batch(max_batch)?;
        Sizes(dims).mul(&dims)?;
        let max_batch = max_batch.min(Self::max_windows(cfg, dims)).max(1);
        let plan = |b| Self::with_host(cfg, dtype, dims, b, host);
        let Some(limit) = limit else {
            return plan(max_batch);
        };
        let one = plan(1)?;
        if one.budget_bytes() > limit {
            let host_part = if host.shares_budget {
                format!(", {} host buffers", human(one.host_bytes))
            } else {
                String::new()
            };
            return Err(Error::OutOfMemory(format!(
                "a {}x{}x{} volume needs {} even with one window per batch ({} weights, {} arena, {} volume buffers{host_part}); the limit is {}",
                dims[2], dims[1], dims[0],
                human(one.budget_bytes()), human(one.call.weight_bytes), human(one.call.arena_bytes),
                human(one.volume_bytes), human(limit)
            )));
        }
        // Memory grows with the batch: bisect for the largest that fits.
        let (mut lo, mut hi) = (one, max_batch + 1);
        while hi - lo.batch > 1 {
            let mid = lo.batch + (hi - lo.batch) / 2;
            let p = plan(mid)?;
            if p.budget_bytes() <= limit {
                lo = p;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// What the budget is held to: the device total, plus the host buffers when they share it.
    pub fn budget_bytes(&self) -> usize {
        if self.request.shares_budget {
            self.total_bytes() + self.host_bytes
        } else {
            self.total_bytes()
        }
    }

    /// Offset of a buffer in the volume region.
    pub fn offset(&self, b: Buf) -> usize {
        self.buffers[b as usize].offset
    }

    /// Everything on the device: weights, the model's arena, the volume region (which holds
    /// the window inputs, outputs and embeddings the model reads and writes), and a session's
    /// embedding cache.
    pub fn total_bytes(&self) -> usize {
        (self.call.weight_bytes + self.call.arena_bytes + self.volume_bytes)
            .saturating_add(self.request.cache_bytes)
    }
}

/// Bytes in binary units, for plans and messages.
pub fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// Parses a size such as `40G`, `512MiB`, `1.5GB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| Error::Usage(format!("`{s}` is not a size (e.g. 40G, 512M)")))?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0f64.powi(4),
        _ => return Err(Error::Usage(format!("`{s}`: unknown size unit `{unit}`"))),
    };
    if !(value.is_finite() && value > 0.0) {
        return Err(Error::Usage(format!("`{s}` is not a positive size")));
    }
    Ok((value * mul) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan of a 512x512x1000 CT in bf16, against a count by hand.
    #[test]
    fn plan_512x512x1000_matches_a_hand_count() {
        let cfg = ModelConfig::full();
        let dims = [1000, 512, 512];
        let p = VolumePlan::new(&cfg, DType::BF16, dims, 4).unwrap();
        let n = 1000 * 512 * 512; // 262,144,000 voxels
        let f32_vol = 4 * n; // 1,048,576,000 bytes = 1000 MiB
        assert_eq!(f32_vol, 1_048_576_000);
        // Peak stage is the zoom-in: cropped volume (kept for the next prompt), global logits,
        // ROI, accumulator, counts (the padded ROI equals the volume here: every axis is at
        // least the window), window batch and logits (4 x 32x256x256 x 4 B = 32 MiB each),
        // the zoom-out embedding and the batch's 4 (2048 x 768 x 2 B = 3 MiB each).
        let win_batch = 4 * 32 * 256 * 256 * 4;
        let emb = 2048 * 768 * 2;
        // cropped, global, ROI, accumulator, counts + window batch, logits and embeddings
        let stage4 = 5 * f32_vol + 2 * win_batch + 5 * emb;
        let stage3 = 3 * f32_vol + 2 * win_batch + 5 * emb; // cropped, global, ROI
                                                            // Lifetime packing reaches the peak exactly: 5000 MiB + 64 MiB + 15 MiB.
        assert!(stage4 > stage3);
        assert_eq!(p.volume_bytes, stage4);
        assert_eq!(p.volume_bytes, 5_325_717_504);
        let sum: usize = p.buffers.iter().map(|b| b.bytes.div_ceil(256) * 256).sum();
        assert!(p.volume_bytes < sum);
        // Weights: 118,618,240 bf16 values and the text tower's 63,559,936 f32 (model::tests).
        let w = 118_618_240 * 2 + 63_559_936 * 4;
        assert!((w..w + 256 * 500).contains(&p.call.weight_bytes));
    }

    #[test]
    fn fit_picks_the_largest_batch_under_the_limit_and_refuses_when_none_fits() {
        let cfg = ModelConfig::full();
        let dims = [300, 512, 512];
        let p8 = VolumePlan::new(&cfg, DType::BF16, dims, 8).unwrap();
        let p4 = VolumePlan::new(&cfg, DType::BF16, dims, 4).unwrap();
        let h = Request::default();
        let fitted =
            VolumePlan::fit(&cfg, DType::BF16, dims, 8, Some(p4.total_bytes() + 1), h).unwrap();
        assert_eq!(fitted.batch, 4);
        assert_eq!(
            VolumePlan::fit(&cfg, DType::BF16, dims, 8, Some(p8.total_bytes()), h)
                .unwrap()
                .batch,
            8
        );
        let err = VolumePlan::fit(&cfg, DType::BF16, dims, 8, Some(1 << 30), h)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("even with one window"), "{err}");
    }

    /// Issue 9 items 5 and 14: sizes never wrap, absurd batches are refused, and a batch is
    /// clamped to the windows the volume has.
    #[test]
    fn plan_arithmetic_is_checked_and_batches_bounded() {
        let cfg = ModelConfig::full();
        let h = Request::default();
        // 2^32 voxels along one axis plans (not wrapped to 0 bytes).
        let p = VolumePlan::fit(&cfg, DType::BF16, [1, 1, 1 << 32], 1, None, h).unwrap();
        assert!(p.volume_bytes >= 5 << 34 && p.host_bytes >= 6 << 32);
        for dims in [
            [1, 1 << 32, 1 << 32],
            [1 << 32, 1 << 32, 1],
            [1 << 21, 1 << 21, 1 << 21],
        ] {
            let e = VolumePlan::fit(&cfg, DType::BF16, dims, 1, None, h)
                .err()
                .unwrap();
            assert!(e.to_string().contains("too large to plan"), "{e}");
            assert_eq!(e.exit_code(), 2);
        }
        for b in [0, MAX_BATCH + 1, 1 << 40] {
            let e = VolumePlan::fit(&cfg, DType::BF16, [32, 256, 256], b, None, h)
                .err()
                .unwrap();
            assert!(e.to_string().contains("batch"), "{e}");
        }
        // One window: a batch of 1000 plans batch 1.
        let p = VolumePlan::fit(&cfg, DType::BF16, [32, 256, 256], 1000, None, h).unwrap();
        assert_eq!(p.batch, 1);
        let p = VolumePlan::fit(&cfg, DType::BF16, [32, 512, 512], 1000, None, h).unwrap();
        assert_eq!(p.batch, VolumePlan::max_windows(&cfg, [32, 512, 512]));
        for dims in [
            [32, 256, 256],
            [1, 1, 1],
            [33, 300, 512],
            [1000, 512, 512],
            [47, 129, 700],
        ] {
            let sw = super::super::geometry::SlidingWindows::new(dims, cfg.spatial_size, 0.5);
            assert_eq!(
                VolumePlan::max_windows(&cfg, dims),
                sw.unwrap().len(),
                "{dims:?}"
            );
        }
    }

    /// Issue 9 item 9: on a host device the host buffers count against the budget.
    #[test]
    fn host_buffers_share_a_host_budget() {
        let cfg = ModelConfig::full();
        let dims = [400, 512, 512];
        let apart = Request {
            prompts: 8,
            ..Request::default()
        };
        let shared = Request {
            prompts: 8,
            shares_budget: true,
            ..Request::default()
        };
        let p = VolumePlan::with_host(&cfg, DType::F32, dims, 1, shared).unwrap();
        // 8 prompts: at least the volume, 8 x (logits + mask) and the output on the host.
        let n = 400 * 512 * 512;
        assert!(p.host_bytes >= 4 * n + 8 * 5 * n + n, "{}", p.host_bytes);
        let between = p.total_bytes() + p.host_bytes / 2;
        assert!(VolumePlan::fit(&cfg, DType::F32, dims, 1, Some(between), apart).is_ok());
        let e = VolumePlan::fit(&cfg, DType::F32, dims, 1, Some(between), shared)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("host buffers"), "{e}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("40G").unwrap(), 40 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert!(parse_size("lots").is_err());
    }
}
