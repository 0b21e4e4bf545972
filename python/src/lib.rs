//! `import segvol`: the resident engine from Python (issue 14). An [`Engine`] loads the model
//! once; [`Session`]s open volumes (numpy arrays, nibabel images, files) and segment prompt
//! after prompt. Compute runs with the GIL released, so Python threads (and other sessions)
//! go on meanwhile; sessions on one engine take turns per model step (`SegVol::exclusive`).
//!
//! Axes: arrays are NIfTI voxel order `(i, j, k)`, as nibabel gives them; segvol's volumes are
//! file order (i fastest), which is the Fortran layout of such an array, so a Fortran-ordered
//! float32 array is copied once with `memcpy` and anything else is gathered in that order.
//! Masks come back as Fortran-ordered `uint8` arrays of the same shape, without a copy.
//!
//! Errors carry the CLI's one-line messages: bad input (a prompt, a volume, a usage fault, a
//! file that is not what it claims) is `ValueError`, a missing or unreadable file `OSError`,
//! anything the engine or the device failed at `segvol.EngineError`.

use numpy::ndarray::{Array3, ShapeBuilder};
use numpy::{IntoPyArray, PyArray3, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use segvol::backend::DeviceSpec;
use segvol::error::Error;
use segvol::io::coords::Affine;
use segvol::io::nifti::{NiftiDtype, Volume};
use segvol::io::prompt::{Units, VolumePrompts};
use segvol::model::SegVol;
use segvol::pipeline::{self, plan, Options, PromptOptions, PromptOutcome, UserPrompt};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

create_exception!(
    segvol,
    EngineError,
    PyRuntimeError,
    "The engine or the device failed (a kernel launch, device memory, an internal invariant)."
);

/// Points a session's arena is planned for up front (as `segvol session`); more grow it once.
const PLANNED_POINTS: usize = 16;

/// A segvol error as the Python exception a caller expects, with the CLI's message.
fn py_err(e: Error) -> PyErr {
    let msg = e.to_string();
    match &e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(msg)
        }
        Error::Io { .. } => PyOSError::new_err(msg),
        Error::Input(_)
        | Error::Prompt(_)
        | Error::Usage(_)
        | Error::Format { .. }
        | Error::Config { .. }
        | Error::MissingTensor { .. }
        | Error::UnexpectedTensor { .. }
        | Error::TensorShape { .. } => PyValueError::new_err(msg),
        _ => EngineError::new_err(msg),
    }
}

fn usage(msg: impl Into<String>) -> PyErr {
    py_err(Error::Usage(msg.into()))
}

/// A memory size: bytes as an int, or text such as "40G" (`plan::parse_size`).
fn size_arg(v: &Bound<'_, PyAny>, what: &str) -> PyResult<usize> {
    if let Ok(n) = v.extract::<usize>() {
        return Ok(n);
    }
    match v.extract::<String>() {
        Ok(s) => plan::parse_size(&s).map_err(py_err),
        Err(_) => Err(usage(format!(
            "{what}: expected a byte count or a size such as \"40G\""
        ))),
    }
}

/// Coordinates as the CLI's flags write them: a string "i,j,k" or a sequence of numbers, put
/// into the comma form so that `VolumePrompts::parse` checks them by one rule everywhere.
fn coords_text(v: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(s.to_string());
    }
    let nums: Vec<f64> = v.extract().map_err(|_| {
        usage(format!(
            "prompt: {what} must be numbers (a sequence) or \"a,b,c\" text"
        ))
    })?;
    Ok(nums
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(","))
}

/// A list of points: one point (three numbers) or a sequence of them.
fn points_text(v: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Vec<String>> {
    let Some(v) = v.filter(|v| !v.is_none()) else {
        return Ok(vec![]);
    };
    if v.cast::<PyString>().is_ok() || v.extract::<Vec<f64>>().is_ok() {
        return Ok(vec![coords_text(v, what)?]);
    }
    let items: Vec<Bound<'_, PyAny>> = v.extract().map_err(|_| {
        usage(format!(
            "prompt: {what} must be a point [i, j, k] or a sequence of them"
        ))
    })?;
    items.iter().map(|p| coords_text(p, what)).collect()
}

/// The prompt arguments of `segment` / `identify`, checked by `segvol::io::prompt`.
struct PromptArgs {
    spec: VolumePrompts,
}

impl PromptArgs {
    fn parse(
        text: Option<String>,
        bbox: Option<&Bound<'_, PyAny>>,
        points: Option<&Bound<'_, PyAny>>,
        negative_points: Option<&Bound<'_, PyAny>>,
        mm: bool,
    ) -> PyResult<Self> {
        let bbox = bbox
            .filter(|b| !b.is_none())
            .map(|b| coords_text(b, "box"))
            .transpose()?;
        let units = if mm {
            Units::Millimetres
        } else {
            Units::Voxels
        };
        let spec = VolumePrompts::parse(
            &text.into_iter().collect::<Vec<_>>(),
            bbox.as_deref(),
            &points_text(points, "points")?,
            &points_text(negative_points, "negative_points")?,
            units,
        )
        .map_err(py_err)?;
        Ok(PromptArgs { spec })
    }

    /// The one model prompt on a volume's grid.
    fn resolve(&self, vol: &VolumeInfo) -> PyResult<UserPrompt> {
        let mut ps = self
            .spec
            .resolve(vol.dims, vol.affine.as_ref())
            .map_err(|e| py_err(in_volume(e, vol)))?;
        Ok(ps.remove(0))
    }
}

/// What a session keeps of its volume once the engine holds the voxels.
#[derive(Clone)]
struct VolumeInfo {
    path: PathBuf,
    dims: [usize; 3],
    affine: Option<Affine>,
    spacing: [f32; 3],
}

impl VolumeInfo {
    fn of(v: &Volume) -> Self {
        VolumeInfo {
            path: v.path.clone(),
            dims: v.dims,
            affine: v.affine,
            spacing: v.spacing,
        }
    }

    fn voxel_ml(&self) -> f64 {
        self.spacing
            .iter()
            .map(|&s| s.abs() as f64)
            .product::<f64>()
            / 1000.0
    }
}

/// Names the volume in faults of its content, as `segment` does for a file.
fn in_volume(e: Error, v: &VolumeInfo) -> Error {
    let p = v.path.display();
    match e {
        Error::Input(m) => Error::Input(format!("{p}: {m}")),
        Error::Prompt(m) => Error::Prompt(format!("{p}: {m}")),
        other => other,
    }
}

/// A 4x4 (or 3x4) voxel-to-world affine from any array-like of numbers.
fn affine_arg(v: &Bound<'_, PyAny>) -> PyResult<Affine> {
    let rows: Vec<Vec<f64>> = v
        .call_method0("tolist")
        .unwrap_or_else(|_| v.clone())
        .extract()
        .map_err(|_| usage("affine: expected a 4x4 array of numbers"))?;
    let ok = (rows.len() == 4 || rows.len() == 3) && rows.iter().all(|r| r.len() == 4);
    if !ok || rows.iter().flatten().any(|x| !x.is_finite()) {
        return Err(usage(format!(
            "affine: expected a 4x4 array of finite numbers, found {} rows",
            rows.len()
        )));
    }
    let mut a: Affine = [
        [0.0, 0.0, 0.0, 0.0],
        [0.0; 4],
        [0.0; 4],
        [0.0, 0.0, 0.0, 1.0],
    ];
    for (r, row) in rows.iter().take(3).enumerate() {
        a[r].copy_from_slice(row);
    }
    if rows.len() == 4 && rows[3] != [0.0, 0.0, 0.0, 1.0] {
        return Err(usage("affine: the last row must be [0, 0, 0, 1]"));
    }
    Ok(a)
}

/// The volume of `engine.open` / `segvol.segment`: a path, a nibabel image or an array.
fn volume_arg(
    py: Python<'_>,
    volume: &Bound<'_, PyAny>,
    affine: Option<&Bound<'_, PyAny>>,
    spacing: Option<&Bound<'_, PyAny>>,
) -> PyResult<Volume> {
    let affine = affine.filter(|a| !a.is_none());
    let spacing = spacing.filter(|s| !s.is_none());
    let np = py.import("numpy")?;
    let is_array = volume.is_instance(&np.getattr("ndarray")?)?;
    if !is_array {
        if let Ok(path) = volume.extract::<PathBuf>() {
            if affine.is_some() || spacing.is_some() {
                return Err(usage(
                    "affine/spacing: a file brings its own geometry; give them with an array only",
                ));
            }
            // Files go through the CLI's one reader, with the GIL released meanwhile.
            return py.detach(|| segvol::io::read_input(&path)).map_err(py_err);
        }
    }
    let f32_dtype = np.getattr("float32")?;
    let (array, affine, name) = if !is_array && volume.hasattr("dataobj")? {
        // A nibabel image: its scaled voxels and its affine (sform, else qform, as segvol).
        if affine.is_some() || spacing.is_some() {
            return Err(usage(
                "affine/spacing: a nibabel image brings its own geometry; give them with an array only",
            ));
        }
        let kw = PyDict::new(py);
        kw.set_item("dtype", &f32_dtype)?;
        let data = volume.call_method("get_fdata", (), Some(&kw))?;
        let name = volume
            .call_method0("get_filename")
            .ok()
            .and_then(|f| f.extract::<String>().ok())
            .unwrap_or_else(|| "<nibabel image>".into());
        (data, affine_arg(&volume.getattr("affine")?)?, name)
    } else {
        let a = match (affine, spacing) {
            (Some(_), Some(_)) => return Err(usage("give affine or spacing, not both")),
            (Some(a), None) => affine_arg(a)?,
            (None, Some(s)) => {
                let s: Vec<f64> = s
                    .extract()
                    .map_err(|_| usage("spacing: expected three numbers (mm per voxel)"))?;
                if s.len() != 3 || s.iter().any(|x| !x.is_finite() || *x <= 0.0) {
                    return Err(usage(
                        "spacing: expected three positive numbers (mm per voxel along i, j, k)",
                    ));
                }
                let mut a: Affine = [[0.0; 4]; 4];
                for (i, &x) in s.iter().enumerate() {
                    a[i][i] = x;
                }
                a[3][3] = 1.0;
                a
            }
            (None, None) => {
                let mut a: Affine = [[0.0; 4]; 4];
                for (i, row) in a.iter_mut().enumerate() {
                    row[i] = 1.0;
                }
                a
            }
        };
        let kw = PyDict::new(py);
        kw.set_item("dtype", &f32_dtype)?;
        let data = np
            .call_method("asarray", (volume,), Some(&kw))
            .map_err(|e| {
                usage(format!(
                    "volume: expected a 3-D numpy array, a nibabel image or a path ({e})"
                ))
            })?;
        (data, a, "<array>".to_string())
    };
    let ndim: usize = array.getattr("ndim")?.extract()?;
    let array = if ndim > 3 {
        // A 4-D image with one volume (dim[4] = 1), as NIfTI readers accept.
        let shape: Vec<usize> = array.getattr("shape")?.extract()?;
        if shape[3..].iter().all(|&d| d == 1) {
            array.call_method1("reshape", (shape[..3].to_vec(),))?
        } else {
            return Err(py_err(Error::Input(format!(
                "{name}: a volume of shape {shape:?}: expected 3-D (i, j, k)"
            ))));
        }
    } else {
        array
    };
    let arr: PyReadonlyArray3<'_, f32> = array.extract().map_err(|_| {
        let shape: Vec<usize> = array
            .getattr("shape")
            .and_then(|s| s.extract())
            .unwrap_or_default();
        py_err(Error::Input(format!(
            "{name}: a volume of shape {shape:?}: expected 3-D (i, j, k)"
        )))
    })?;
    let shape = arr.shape();
    let dims = [shape[0], shape[1], shape[2]];
    let view = arr.as_array();
    // File order is i fastest: the reversed view read row-major.
    let t = view.reversed_axes();
    let data: Vec<f32> = match t.as_slice() {
        Some(s) => s.to_vec(),
        None => t.iter().copied().collect(),
    };
    Volume::from_grid(PathBuf::from(name), dims, data, affine, NiftiDtype::F32).map_err(py_err)
}

/// A mask in file order as a Fortran-ordered `(i, j, k)` uint8 array (no copy).
fn mask_array<'py>(py: Python<'py>, dims: [usize; 3], mask: Vec<u8>) -> Bound<'py, PyArray3<u8>> {
    Array3::from_shape_vec((dims[0], dims[1], dims[2]).f(), mask)
        .expect("a mask has one value per voxel")
        .into_pyarray(py)
}

fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (v.to_string(),))
}

/// The report of one prompt: the fields of `segvol session`'s reply.
fn prompt_report(p: &PromptOutcome, vol: &VolumeInfo, total_s: f64) -> Value {
    json!({
        "input": vol.path,
        "dims_ijk": vol.dims,
        "spacing": vol.spacing,
        "prompt": p.prompt.describe(),
        "voxels": p.voxels,
        "ml": p.voxels as f64 * vol.voxel_ml(),
        "roi": p.roi.map(|r| json!({"start_dhw": r.start, "shape_dhw": r.shape})),
        "windows": p.windows.len(),
        "cached_windows": p.cached_windows,
        "roi_kept": p.roi_kept,
        "seconds": {"zoom_out": p.zoom_out_seconds, "zoom_in": p.zoom_in_seconds, "total": total_s},
    })
}

/// A model loaded once on a device: opens sessions on volumes.
#[pyclass(module = "segvol", frozen)]
struct Engine {
    inner: Arc<pipeline::Engine>,
    device: String,
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (model_dir, device = "cpu", precision = None, mem_limit = None, batch = 1))]
    fn new(
        py: Python<'_>,
        model_dir: PathBuf,
        device: &str,
        precision: Option<&str>,
        mem_limit: Option<&Bound<'_, PyAny>>,
        batch: usize,
    ) -> PyResult<Self> {
        let spec = DeviceSpec::parse(device, precision).map_err(py_err)?;
        plan::check_batch(batch).map_err(py_err)?;
        let mem_limit = mem_limit
            .filter(|m| !m.is_none())
            .map(|m| size_arg(m, "mem_limit"))
            .transpose()?;
        let opts = Options {
            batch,
            zoom_in: true,
            mem_limit,
        };
        let model = py
            .detach(|| -> segvol::Result<SegVol> {
                if !model_dir.exists() {
                    return Err(Error::io(
                        &model_dir,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "model directory not found",
                        ),
                    ));
                }
                SegVol::load(&model_dir, spec.open()?)
            })
            .map_err(py_err)?;
        let device = format!("{} ({})", model.backend().name(), model.backend().dtype());
        Ok(Engine {
            inner: Arc::new(pipeline::Engine::new(model, opts)),
            device,
        })
    }

    /// The device and storage precision, e.g. "cpu (f32)".
    #[getter]
    fn device(&self) -> &str {
        &self.device
    }

    /// Opens a volume for prompting: preprocessing, crop and the zoom-out embedding run once.
    #[pyo3(signature = (volume, affine = None, spacing = None, cache = None))]
    fn open(
        &self,
        py: Python<'_>,
        volume: &Bound<'_, PyAny>,
        affine: Option<&Bound<'_, PyAny>>,
        spacing: Option<&Bound<'_, PyAny>>,
        cache: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Session> {
        let cache_bytes = match cache.filter(|c| !c.is_none()) {
            Some(c) => size_arg(c, "cache")?,
            None => 1 << 30,
        };
        let vol = volume_arg(py, volume, affine, spacing)?;
        let info = VolumeInfo::of(&vol);
        let engine = self.inner.clone();
        let session = py
            .detach(move || {
                let request = plan::Request {
                    prompts: 1,
                    shares_budget: false,
                    sparse_tokens: PLANNED_POINTS + 3,
                    text_tokens: engine.model().config().text.max_positions,
                    cache_bytes,
                };
                engine.open(&vol.data, vol.model_dims(), request)
            })
            .map_err(|e| py_err(in_volume(e, &info)))?;
        Ok(Session {
            inner: session,
            vol: info,
        })
    }

    fn __repr__(&self) -> String {
        format!("segvol.Engine(device={:?})", self.device)
    }
}

/// One volume opened on an engine, prompted again and again.
#[pyclass(module = "segvol", frozen)]
struct Session {
    inner: pipeline::Session<'static>,
    vol: VolumeInfo,
}

#[pymethods]
impl Session {
    /// Segments one prompt; returns (mask, report).
    #[pyo3(signature = (text = None, r#box = None, points = None, negative_points = None, mm = false, keep_roi = false))]
    #[allow(clippy::too_many_arguments)]
    fn segment<'py>(
        &self,
        py: Python<'py>,
        text: Option<String>,
        r#box: Option<&Bound<'py, PyAny>>,
        points: Option<&Bound<'py, PyAny>>,
        negative_points: Option<&Bound<'py, PyAny>>,
        mm: bool,
        keep_roi: bool,
    ) -> PyResult<(Bound<'py, PyArray3<u8>>, Bound<'py, PyAny>)> {
        let t0 = Instant::now();
        let prompt =
            PromptArgs::parse(text, r#box, points, negative_points, mm)?.resolve(&self.vol)?;
        let (mask, report) = py
            .detach(|| -> segvol::Result<(Vec<u8>, Value)> {
                let p =
                    self.inner
                        .segment_with(&prompt, PromptOptions { keep_roi }, &mut |_, _| {})?;
                let report = prompt_report(&p, &self.vol, 0.0);
                Ok((self.inner.outcome(vec![p]).mask(0), report))
            })
            .map_err(|e| py_err(in_volume(e, &self.vol)))?;
        let mut report = report;
        report["seconds"]["total"] = json!(t0.elapsed().as_secs_f64());
        Ok((mask_array(py, self.vol.dims, mask), to_py(py, &report)?))
    }

    /// Names what a spatial prompt segments: [(name, score, share), ...], best first.
    #[pyo3(signature = (r#box = None, points = None, negative_points = None, mm = false, candidates = None))]
    fn identify<'py>(
        &self,
        py: Python<'py>,
        r#box: Option<&Bound<'py, PyAny>>,
        points: Option<&Bound<'py, PyAny>>,
        negative_points: Option<&Bound<'py, PyAny>>,
        mm: bool,
        candidates: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let prompt =
            PromptArgs::parse(None, r#box, points, negative_points, mm)?.resolve(&self.vol)?;
        let candidates = candidates.unwrap_or_else(|| {
            pipeline::DEFAULT_CANDIDATES
                .iter()
                .map(|s| s.to_string())
                .collect()
        });
        let id = py
            .detach(|| self.inner.identify(&prompt, &candidates))
            .map_err(|e| py_err(in_volume(e, &self.vol)))?;
        PyList::new(py, id.ranked)
    }

    /// The volume's shape (i, j, k).
    #[getter]
    fn shape(&self) -> (usize, usize, usize) {
        let [i, j, k] = self.vol.dims;
        (i, j, k)
    }

    /// Bytes of zoom-in embeddings the session holds now.
    #[getter]
    fn cache_bytes(&self) -> usize {
        self.inner.cache_bytes()
    }

    fn __repr__(&self) -> String {
        let [i, j, k] = self.vol.dims;
        format!(
            "segvol.Session({}, shape=({i}, {j}, {k}))",
            self.vol.path.display()
        )
    }
}

/// One-shot: load the model, segment one prompt on one volume; returns (mask, report).
#[pyfunction]
#[pyo3(signature = (volume, model_dir, text = None, r#box = None, points = None, negative_points = None, mm = false, device = "cpu", precision = None, mem_limit = None, batch = 1, affine = None, spacing = None))]
#[allow(clippy::too_many_arguments)]
fn segment<'py>(
    py: Python<'py>,
    volume: &Bound<'py, PyAny>,
    model_dir: PathBuf,
    text: Option<String>,
    r#box: Option<&Bound<'py, PyAny>>,
    points: Option<&Bound<'py, PyAny>>,
    negative_points: Option<&Bound<'py, PyAny>>,
    mm: bool,
    device: &str,
    precision: Option<&str>,
    mem_limit: Option<&Bound<'py, PyAny>>,
    batch: usize,
    affine: Option<&Bound<'py, PyAny>>,
    spacing: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Bound<'py, PyArray3<u8>>, Bound<'py, PyAny>)> {
    let t0 = Instant::now();
    // Prompts and the volume are checked before the model loads.
    let prompts = PromptArgs::parse(text, r#box, points, negative_points, mm)?;
    let vol = volume_arg(py, volume, affine, spacing)?;
    let info = VolumeInfo::of(&vol);
    let prompt = prompts.resolve(&info)?;
    let engine = Engine::new(py, model_dir, device, precision, mem_limit, batch)?;
    let (mask, report) = py
        .detach(|| -> segvol::Result<(Vec<u8>, Value)> {
            // The CLI's one-shot path: a plan sized for exactly this prompt.
            let out = engine.inner.segment(
                &vol.data,
                vol.model_dims(),
                std::slice::from_ref(&prompt),
                &mut |_, _| {},
            )?;
            let report = prompt_report(&out.prompts[0], &info, 0.0);
            Ok((out.mask(0), report))
        })
        .map_err(|e| py_err(in_volume(e, &info)))?;
    let mut report = report;
    report["seconds"]["total"] = json!(t0.elapsed().as_secs_f64());
    Ok((mask_array(py, info.dims, mask), to_py(py, &report)?))
}

/// SegVol 3-D CT segmentation from text, box and point prompts, on segvol's Rust engine.
#[pymodule]
#[pyo3(name = "segvol")]
fn segvol_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Session>()?;
    m.add_function(wrap_pyfunction!(segment, m)?)?;
    m.add("EngineError", m.py().get_type::<EngineError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULT_CANDIDATES", pipeline::DEFAULT_CANDIDATES.to_vec())?;
    Ok(())
}
