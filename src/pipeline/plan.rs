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
}

/// Prompt shape assumed for planning: a box and a text of the template's typical length.
const PLAN_SPARSE: usize = 3;
const PLAN_TEXT_LEN: usize = 16;

impl VolumePlan {
    /// Plans a volume of model-frame dims (D, H, W) with windows in batches of `batch`.
    pub fn new(cfg: &ModelConfig, dtype: DType, dims: [usize; 3], batch: usize) -> Result<Self> {
        if batch == 0 {
            return Err(Error::Usage("--batch must be at least 1".into()));
        }
        let n: usize = dims.iter().product();
        let win = cfg.window_voxels();
        let padded: usize = (0..3).map(|a| dims[a].max(cfg.spatial_size[a])).product();
        let emb = cfg.num_tokens() * cfg.decoder.dim * dtype.size();
        let f = 4;
        let specs = Buf::ALL.map(|b| {
            let (bytes, first, last) = match b {
                Buf::Volume => (n * f, 0, 1),
                // Every prompt's zoom-in reads it (stages 2..5 repeat per prompt).
                Buf::Cropped => (n * f, 1, 5),
                Buf::Global => (n * f, 2, 5),
                Buf::ZoomOutEmbedding => (emb, 2, 5),
                Buf::Roi => (n * f, 3, 4),
                Buf::WindowBatch => (batch * win * f, 2, 4),
                Buf::WindowLogits => (batch * win * f, 2, 4),
                Buf::WindowEmbeddings => (batch * emb, 3, 4),
                Buf::Accumulator => (padded * f, 4, 5),
                Buf::Counts => (padded * f, 4, 5),
                Buf::Mask => (n, 5, 5),
            };
            (b.name(), bytes, first, last)
        });
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
        let call = CallPlan::new(cfg, dtype, batch, PLAN_SPARSE, PLAN_TEXT_LEN)?;
        Ok(VolumePlan {
            dims,
            batch,
            dtype,
            call,
            buffers,
            volume_bytes,
        })
    }

    /// The largest batch in `1..=max_batch` whose plan fits `limit` bytes (no limit: `max_batch`).
    /// Refuses up front when even batch 1 does not fit.
    pub fn fit(
        cfg: &ModelConfig,
        dtype: DType,
        dims: [usize; 3],
        max_batch: usize,
        limit: Option<usize>,
    ) -> Result<Self> {
        let max_batch = max_batch.max(1);
        let Some(limit) = limit else {
            return Self::new(cfg, dtype, dims, max_batch);
        };
        let one = Self::new(cfg, dtype, dims, 1)?;
        if one.total_bytes() > limit {
            return Err(Error::OutOfMemory(format!(
                "a {}x{}x{} volume needs {} even with one window per batch ({} weights, {} arena, {} volume buffers); the limit is {}",
                dims[2], dims[1], dims[0],
                human(one.total_bytes()), human(one.call.weight_bytes), human(one.call.arena_bytes),
                human(one.volume_bytes), human(limit)
            )));
        }
        let mut best = one;
        for b in 2..=max_batch {
            let p = Self::new(cfg, dtype, dims, b)?;
            if p.total_bytes() > limit {
                break;
            }
            best = p;
        }
        Ok(best)
    }

    /// Offset of a buffer in the volume region.
    pub fn offset(&self, b: Buf) -> usize {
        self.buffers[b as usize].offset
    }

    /// Everything on the device: weights, the model's arena, the volume region (which holds
    /// the window inputs, outputs and embeddings the model reads and writes).
    pub fn total_bytes(&self) -> usize {
        self.call.weight_bytes + self.call.arena_bytes + self.volume_bytes
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
        let fitted =
            VolumePlan::fit(&cfg, DType::BF16, dims, 8, Some(p4.total_bytes() + 1)).unwrap();
        assert_eq!(fitted.batch, 4);
        assert_eq!(
            VolumePlan::fit(&cfg, DType::BF16, dims, 8, Some(p8.total_bytes()))
                .unwrap()
                .batch,
            8
        );
        let err = VolumePlan::fit(&cfg, DType::BF16, dims, 8, Some(1 << 30))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("even with one window"), "{err}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("40G").unwrap(), 40 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert!(parse_size("lots").is_err());
    }
}
