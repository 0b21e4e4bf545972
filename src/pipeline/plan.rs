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
        let specs: [(&'static str, usize, usize, usize); 10] = [
            ("volume (raw, normalised in place)", n * f, 0, 1),
            ("cropped volume", n * f, 1, 3),
            ("global logits (cropped grid)", n * f, 2, 5),
            ("zoom-out image embedding", emb, 2, 5),
            ("ROI volume", n * f, 3, 4),
            ("window batch", batch * win * f, 2, 4),
            ("window logits", batch * win * f, 2, 4),
            ("sliding-window accumulator", padded * f, 4, 5),
            ("sliding-window counts", padded * f, 4, 5),
            ("mask (u8)", n, 5, 5),
        ];
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

    /// Everything on the device: weights, arena, call buffers, volume region.
    pub fn total_bytes(&self) -> usize {
        self.call.total_bytes() + self.volume_bytes
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
        // Peak stage is the zoom-in: cropped volume (until the ROI is cut), global logits,
        // ROI, accumulator, counts (the padded ROI equals the volume here: every axis is at
        // least the window), window batch and logits (4 x 32x256x256 x 4 B = 32 MiB each),
        // and the zoom-out embedding (2048 x 768 x 2 B = 3 MiB).
        let win_batch = 4 * 32 * 256 * 256 * 4;
        let emb = 2048 * 768 * 2;
        let stage4 = 4 * f32_vol + 2 * win_batch + emb; // global, ROI, acc, counts + batches + emb
        let stage3 = 3 * f32_vol + 2 * win_batch + emb; // cropped, global, ROI
                                                        // Lifetime packing reaches the peak exactly: 4000 MiB + 64 MiB + 3 MiB.
        assert!(stage4 > stage3);
        assert_eq!(p.volume_bytes, stage4);
        assert_eq!(p.volume_bytes, 4_264_558_592);
        let sum: usize = p.buffers.iter().map(|b| b.bytes.div_ceil(256) * 256).sum();
        assert!(p.volume_bytes < sum);
        // Weights: 182,178,176 bf16 values (see model::tests).
        assert!((364_356_352..364_356_352 + 256 * 500).contains(&p.call.weight_bytes));
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
