//! `segvol serve`: MONAI Label's REST protocol over resident sessions, so 3D Slicer's MONAI
//! Label module (and other MONAI Label clients) drive SegVol with no plugin of ours. The
//! endpoints and their shapes follow ../shared/docs/client-protocols.md §B (read from MONAI
//! Label's `monailabel/endpoints/*.py` and its Slicer client, 0.8.5):
//!
//! - `GET /info/`: one model `segvol` of type `deepgrow`, dimension 3, labels = the default
//!   category list; no top-level `config` key (Slicer refuses such a server). A `segvol` key
//!   reports sessions, memory and queue depth (also `GET /health`).
//! - `GET /auth/`, `POST /auth/token`, `GET /auth/token/valid`: auth is off unless `--token`;
//!   then every other endpoint needs `Authorization: Bearer <token>`, and the token endpoint
//!   hands it out for the password `<token>` (any user name).
//! - `PUT /datastore/?image=ID` (and `/datastore/image`): multipart `file` (+ `params`) →
//!   `{"image": ID}`; `PUT /session/` (multipart `files`) → `{"session_id", "session_info"}`,
//!   `GET`/`DELETE /session/{id}`.
//! - `POST /infer/segvol?image=ID[&session_id=S][&output=image|json|all]`: multipart
//!   `params` ([`params`]); the reply is multipart `params` (JSON with `label_names`) + `image`
//!   (the mask file on the uploaded image's grid and header), or one of them with `output`.
//!
//! The event loop never runs model work: every session open and prompt is a job on one engine
//! thread behind a bounded queue (full: 503 with `Retry-After`), each request waits at most
//! `--timeout`. Uploads are capped (`--max-upload`, 413). Bad requests get a 4xx JSON
//! `{"detail": ...}` naming the fault. SIGTERM/SIGINT stop accepting connections and finish
//! the requests in flight before exiting.

mod params;
mod state;

use crate::DeviceArgs;
use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use clap::Args;
use params::ResultFormat;
use segvol::error::{Error, Result};
use segvol::io::nifti::Volume;
use segvol::pipeline::{self, plan::parse_size, Engine, Options};
use serde::Deserialize;
use serde_json::{json, Value};
use state::{DeviceQueue, EngineCfg, Entry, Kind, QueueError, Table};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The one model this server declares.
const MODEL: &str = "segvol";

#[derive(Args)]
pub struct ServeArgs {
    /// Model directory (Hugging Face layout) or weights file.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    device: DeviceArgs,
    /// Address to listen on (loopback by default; elsewhere, use --token).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    /// Require `Authorization: Bearer <T>` on every endpoint but /auth/ and /health.
    #[arg(long)]
    token: Option<String>,
    /// Memory budget for the resident images and sessions (e.g. 8G; default: the host's
    /// available memory less 1 GiB). Least recently used sessions are evicted to fit.
    #[arg(long)]
    mem_limit: Option<String>,
    /// Largest request body accepted (an uploaded image), e.g. 1G.
    #[arg(long, default_value = "1G")]
    max_upload: String,
    /// Seconds an image (and its session) is kept after its last use.
    #[arg(long, default_value_t = 3600)]
    session_ttl: u64,
    /// Embedding cache of each resident session (e.g. 512M; 0: none).
    #[arg(long, default_value = "512M")]
    cache: String,
    /// Requests that may wait for the device; more get 503 with Retry-After.
    #[arg(long, default_value_t = 32)]
    queue: usize,
    /// Seconds a request may wait and run before it gets 504.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Images kept at most (the least recently used goes first).
    #[arg(long, default_value_t = 64)]
    max_images: usize,
    /// Windows per model call in the zoom-in.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Directory for uploaded images (default: a temporary directory removed at exit).
    #[arg(long)]
    store: Option<PathBuf>,
}

struct AppState {
    table: Arc<parking_lot::Mutex<Table>>,
    eng: Arc<EngineCfg>,
    queue: DeviceQueue,
    store: PathBuf,
    token: Option<String>,
    timeout: Duration,
    max_upload: usize,
    device: String,
    started: Instant,
    requests: AtomicU64,
    counter: AtomicU64,
}

type Shared = Arc<AppState>;

pub fn run(a: ServeArgs) -> Result<()> {
    pipeline::plan::check_batch(a.batch)?;
    let addr: std::net::SocketAddr = a.listen.parse().map_err(|_| {
        Error::Usage(format!(
            "--listen {}: expected ADDRESS:PORT, e.g. 127.0.0.1:8000",
            a.listen
        ))
    })?;
    if a.queue == 0 || a.timeout == 0 || a.max_images == 0 || a.session_ttl == 0 {
        return Err(Error::Usage(
            "--queue, --timeout, --max-images and --session-ttl must be positive".into(),
        ));
    }
    if a.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(Error::Usage("--token: empty".into()));
    }
    let mem_limit = a.mem_limit.as_deref().map(parse_size).transpose()?;
    let max_upload = parse_size(&a.max_upload)?;
    let cache_bytes = parse_size(&a.cache)?;
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    let (store, temp_store) = match &a.store {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            (d.clone(), false)
        }
        None => {
            let d = std::env::temp_dir().join(format!("segvol-serve-{}", std::process::id()));
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
            (d, true)
        }
    };
    let t0 = Instant::now();
    let model = crate::load_model(&a.model, &a.device)?;
    let device = format!("{} ({})", model.backend().name(), model.backend().dtype());
    let opts = Options {
        batch: a.batch,
        zoom_in: true,
        mem_limit,
    };
    let eng = Arc::new(EngineCfg {
        engine: Engine::new(model, opts),
        cache_bytes,
    });
    let table = Arc::new(parking_lot::Mutex::new(Table {
        entries: HashMap::new(),
        budget: mem_limit.unwrap_or_else(state::default_budget),
        ttl: Duration::from_secs(a.session_ttl),
        max_images: a.max_images,
        opened: 0,
        evicted: 0,
        expired: 0,
    }));
    let st = Arc::new(AppState {
        table: table.clone(),
        eng,
        queue: DeviceQueue::start(a.queue),
        store: store.clone(),
        token: a.token.clone(),
        timeout: Duration::from_secs(a.timeout),
        max_upload,
        device: device.clone(),
        started: Instant::now(),
        requests: AtomicU64::new(0),
        counter: AtomicU64::new(0),
    });
    let app = router(st.clone(), max_upload);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Error::Internal(format!("tokio runtime: {e}")))?;
    let stop = Arc::new(tokio::sync::Notify::new());
    {
        let stop = stop.clone();
        crate::signals::on_first_signal(Box::new(move |name| {
            eprintln!("segvol serve: {name}: finishing the requests in flight, then exiting");
            stop.notify_one();
        }));
    }
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Usage(format!("--listen {addr}: {e}")))?;
        let bound = listener.local_addr().map_err(|e| Error::io("<socket>", e))?;
        if !bound.ip().is_loopback() && a.token.is_none() {
            tracing::warn!(
                "listening on {bound}, off loopback, without --token: anyone who reaches this address can upload images and run the model"
            );
        }
        eprintln!(
            "segvol serve: model {} on {device} loaded in {:.1} s; MONAI Label server at http://{bound}/ (model `{MODEL}`)",
            a.model.display(),
            t0.elapsed().as_secs_f64()
        );
        // TTL expiry, once a second.
        let expiring = table.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let n = expiring.lock().expire(Instant::now());
                if n > 0 {
                    tracing::info!("expired {n} image(s) unused for the TTL");
                }
            }
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.notified().await })
            .await
            .map_err(|e| Error::Internal(format!("server: {e}")))
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    if temp_store {
        let _ = std::fs::remove_dir_all(&store);
    }
    if result.is_ok() {
        eprintln!(
            "segvol serve: stopped after {} request(s)",
            st.requests.load(Ordering::SeqCst)
        );
    }
    result
}

fn router(st: Shared, max_upload: usize) -> Router {
    Router::new()
        .route("/info", get(info))
        .route("/info/", get(info))
        .route("/health", get(health))
        .route("/auth", get(auth))
        .route("/auth/", get(auth))
        .route("/auth/token", post(auth_token))
        .route("/auth/token/valid", get(auth_valid))
        .route("/datastore", put(upload_image).get(datastore))
        .route("/datastore/", put(upload_image).get(datastore))
        .route("/datastore/image", put(upload_image))
        .route("/session", put(create_session))
        .route("/session/", put(create_session))
        .route("/session/{id}", get(get_session).delete(remove_session))
        .route("/infer/{model}", post(infer))
        .fallback(not_found)
        // The limit multipart reads under; bodies announced larger are refused up front.
        .layer(DefaultBodyLimit::max(max_upload))
        .layer(middleware::from_fn_with_state(st.clone(), guard))
        .with_state(st)
}

/// A 4xx/5xx reply: `{"detail": ...}` as FastAPI (MONAI Label's server) writes it.
struct ApiError {
    status: StatusCode,
    detail: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: detail.into(),
            retry_after: None,
        }
    }
    fn bad(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::OutOfMemory(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Device { .. } | Error::Internal(_) | Error::DeviceUnavailable { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({"detail": self.detail, "status": self.status.as_u16()})),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r.extensions_mut().insert(LogNote {
            error: Some(self.detail),
            ..Default::default()
        });
        r
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// What a handler adds to the request's log line.
#[derive(Clone, Default)]
struct LogNote {
    image: Option<String>,
    prompts: Option<String>,
    queue_s: Option<f64>,
    compute_s: Option<f64>,
    error: Option<String>,
}

/// Auth, the upload limit and one log line per request (method, path, image, prompt kinds,
/// queue wait, compute time, status).
async fn guard(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    st.requests.fetch_add(1, Ordering::SeqCst);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let open = matches!(
        path.as_str(),
        "/auth" | "/auth/" | "/auth/token" | "/health"
    );
    let resp = if let (Some(token), false) = (&st.token, open) {
        if bearer(req.headers()).is_some_and(|t| t == token) {
            None
        } else {
            Some(
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token (Authorization: Bearer <token>; see POST /auth/token)",
                )
                .into_response(),
            )
        }
    } else {
        None
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let resp = match (resp, declared) {
        (Some(r), _) => r,
        (None, Some(n)) if n > st.max_upload as u64 => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body of {n} bytes exceeds the server's upload limit of {} bytes (--max-upload)",
                st.max_upload
            ),
        )
        .into_response(),
        (None, _) => next.run(req).await,
    };
    let note = resp
        .extensions()
        .get::<LogNote>()
        .cloned()
        .unwrap_or_default();
    let f = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{s:.3}"));
    tracing::info!(
        "{method} {path} status={} image={} prompts={} queue_s={} compute_s={} total_s={:.3}{}",
        resp.status().as_u16(),
        note.image.as_deref().unwrap_or("-"),
        note.prompts.as_deref().unwrap_or("-"),
        f(note.queue_s),
        f(note.compute_s),
        t0.elapsed().as_secs_f64(),
        note.error
            .map(|e| format!(" error={e:?}"))
            .unwrap_or_default()
    );
    resp
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, tok) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(tok.trim())
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {} {} (this server speaks MONAI Label's /info/, /auth/, /datastore/, /session/, /infer/{MODEL})",
            req.method(),
            req.uri().path()
        ),
    )
}

fn status_json(st: &AppState) -> Value {
    let t = st.table.lock();
    json!({
        "device": st.device,
        "images": t.entries.len(),
        "sessions": t.sessions(),
        "resident_bytes": t.resident_bytes(),
        "budget_bytes": t.budget,
        "sessions_opened": t.opened,
        "sessions_evicted": t.evicted,
        "images_expired": t.expired,
        "queue_depth": st.queue.depth(),
        "queue_capacity": st.queue.capacity,
        "engine_busy": st.queue.busy(),
        "requests": st.requests.load(Ordering::SeqCst),
        "uptime_s": st.started.elapsed().as_secs_f64(),
    })
}

async fn info(State(st): State<Shared>) -> Json<Value> {
    let labels: Vec<&str> = pipeline::DEFAULT_CANDIDATES.to_vec();
    let datastore_total = st.table.lock().entries.len();
    Json(json!({
        "name": "segvol",
        "description": "SegVol (universal 3-D CT segmentation from text, box and point prompts) served by segvol",
        "version": env!("CARGO_PKG_VERSION"),
        "labels": labels,
        "models": {
            MODEL: {
                "type": "deepgrow",
                "labels": labels,
                "dimension": 3,
                "description": "SegVol: the segment's name is the text prompt, foreground/background clicks the points, the ROI the 3-D box",
                "config": {},
            }
        },
        "trainers": {},
        "strategies": {},
        "scoring": {},
        "train_stats": {},
        "datastore": {"total": datastore_total, "completed": 0},
        "segvol": status_json(&st),
    }))
}

async fn health(State(st): State<Shared>) -> Json<Value> {
    let mut v = status_json(&st);
    v["ok"] = json!(true);
    Json(v)
}

async fn auth(State(st): State<Shared>) -> Json<Value> {
    Json(json!({"enabled": st.token.is_some(), "client_id": "segvol", "realm": "segvol"}))
}

async fn auth_token(
    State(st): State<Shared>,
    form: std::result::Result<
        axum::Form<HashMap<String, String>>,
        axum::extract::rejection::FormRejection,
    >,
) -> ApiResult<Json<Value>> {
    let Some(token) = &st.token else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "auth is disabled on this server (started without --token)",
        ));
    };
    let axum::Form(form) = form.map_err(|e| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("POST /auth/token takes a form (username, password, grant_type): {e}"),
        )
    })?;
    if form.get("password") != Some(token) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong password (the password is the server's --token)",
        ));
    }
    Ok(Json(json!({"access_token": token, "token_type": "bearer"})))
}

async fn auth_valid() -> Json<Value> {
    // The guard has checked the bearer token by the time this runs.
    Json(json!({"valid": true}))
}

async fn datastore(State(st): State<Shared>) -> Json<Value> {
    let t = st.table.lock();
    let mut objects = serde_json::Map::new();
    for (id, e) in t.entries.iter().filter(|(_, e)| e.kind == Kind::Datastore) {
        objects.insert(
            id.clone(),
            json!({"image": {"info": {"name": e.name, "dims": e.dims}}, "labels": {}}),
        );
    }
    Json(json!({"name": "segvol", "total": objects.len(), "objects": objects}))
}

/// A random hex id (16 bytes of /dev/urandom, mixed with a counter if that fails).
fn random_id(st: &AppState) -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !ok {
        let n = st.counter.fetch_add(1, Ordering::SeqCst);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b[..8].copy_from_slice(&n.to_le_bytes());
        b[8..].copy_from_slice(&(t as u64).to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The image formats accepted, by file name: the extension the stored copy keeps.
fn image_extension(name: &str) -> Option<&'static str> {
    let n = name.to_ascii_lowercase();
    [".nii.gz", ".nii", ".nrrd"]
        .into_iter()
        .find(|e| n.ends_with(e))
}

/// A part of a multipart body read whole (the body limit bounds it).
struct Part {
    name: String,
    file_name: Option<String>,
    data: axum::body::Bytes,
}

async fn read_parts(
    mp: std::result::Result<Multipart, MultipartRejection>,
    what: &str,
) -> ApiResult<Vec<Part>> {
    let mut mp = mp.map_err(|e| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("{what} takes multipart/form-data: {}", e.body_text()),
        )
    })?;
    let mut parts = Vec::new();
    loop {
        match mp.next_field().await {
            Ok(None) => return Ok(parts),
            Ok(Some(f)) => {
                let name = f.name().unwrap_or("").to_string();
                let file_name = f.file_name().map(str::to_string);
                let data = f.bytes().await.map_err(|e| multipart_error(e, what))?;
                parts.push(Part {
                    name,
                    file_name,
                    data,
                });
            }
            Err(e) => return Err(multipart_error(e, what)),
        }
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError, what: &str) -> ApiError {
    let status = e.status();
    let detail = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!("{what}: the body exceeds the server's upload limit (--max-upload)")
    } else {
        format!("{what}: malformed multipart body: {}", e.body_text())
    };
    ApiError::new(status, detail)
}

/// Stores an uploaded image under `id` after reading it as a volume (off the event loop): a
/// file that is not a readable .nii/.nii.gz/.nrrd volume is refused and nothing is kept.
async fn add_image(st: &Shared, id: String, kind: Kind, part: Part) -> ApiResult<Entry> {
    let fname = part.file_name.clone().unwrap_or_default();
    let ext = image_extension(&fname).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "upload `{}`: not an image this server reads (give a .nii, .nii.gz or .nrrd file)",
                segvol::error::clip(&fname)
            ),
        )
    })?;
    if part.data.is_empty() {
        return Err(ApiError::bad(format!(
            "upload `{fname}`: the file is empty"
        )));
    }
    let dir = st.store.join(random_id(st));
    let base = Path::new(&fname)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .unwrap_or_else(|| format!("image{ext}"));
    let path = dir.join(&base);
    let data = part.data;
    let p = path.clone();
    let read = tokio::task::spawn_blocking(move || -> Result<Volume> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        segvol::io::write_atomic(&p, &data)?;
        match segvol::io::read_input(&p) {
            Ok(v) => Ok(v),
            Err(e) => {
                let _ = std::fs::remove_file(&p);
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("upload: {e}")))?;
    let vol = read.map_err(|e| {
        // Name the upload, not the server's copy of it.
        let msg = e.to_string().replace(&path.display().to_string(), &fname);
        match e {
            Error::Internal(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg),
            _ => ApiError::bad(format!("upload: {msg}")),
        }
    })?;
    let _ = id;
    Ok(Entry {
        kind,
        file: path,
        name: base,
        dims: vol.dims,
        vol: Some(Arc::new(vol)),
        session: None,
        session_bytes: 0,
        created: std::time::SystemTime::now(),
        last_used: Instant::now(),
        infers: 0,
    })
}

/// Inserts an entry, making room for its volume (its old entry under the same id is replaced).
fn insert(st: &Shared, id: &str, e: Entry) -> ApiResult<()> {
    let mut t = st.table.lock();
    t.remove(id);
    t.make_slot();
    let need = e.vol.as_ref().map_or(0, |v| v.data.len() * 4);
    if !t.make_room(need, id) {
        let _ = std::fs::remove_file(&e.file);
        return Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!(
                "image `{id}`: its volume ({}) does not fit the server's memory budget ({})",
                pipeline::plan::human(need),
                pipeline::plan::human(t.budget)
            ),
        ));
    }
    t.entries.insert(id.to_string(), e);
    Ok(())
}

#[derive(Deserialize)]
struct ImageQuery {
    image: Option<String>,
}

fn check_id(id: &str) -> ApiResult<()> {
    if id.is_empty() || id.len() > 256 || id.chars().any(|c| c.is_control()) {
        return Err(ApiError::bad(format!(
            "image id `{}`: expected 1 to 256 printable characters",
            segvol::error::clip(id)
        )));
    }
    Ok(())
}

async fn upload_image(
    State(st): State<Shared>,
    q: std::result::Result<Query<ImageQuery>, axum::extract::rejection::QueryRejection>,
    mp: std::result::Result<Multipart, MultipartRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError::bad(format!("query: {e}")))?;
    let parts = read_parts(mp, "PUT /datastore/").await?;
    if let Some(p) = parts.iter().find(|p| p.name == "params") {
        let text = std::str::from_utf8(&p.data).unwrap_or("\u{fffd}");
        if !text.trim().is_empty() {
            serde_json::from_str::<Value>(text)
                .map_err(|e| ApiError::bad(format!("params: not valid JSON: {e}")))?;
        }
    }
    let file = parts
        .into_iter()
        .find(|p| p.name == "file")
        .ok_or_else(|| ApiError::bad("PUT /datastore/: no `file` part (the image)"))?;
    let fname = file.file_name.clone().unwrap_or_default();
    let id = match q.image.filter(|s| !s.is_empty()) {
        Some(id) => id,
        None => {
            let ext = image_extension(&fname).unwrap_or("");
            let base = Path::new(&fname)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            base[..base.len() - ext.len()].to_string()
        }
    };
    check_id(&id)?;
    let entry = add_image(&st, id.clone(), Kind::Datastore, file).await?;
    let dims = entry.dims;
    insert(&st, &id, entry)?;
    let mut r = Json(json!({"image": id, "dims": dims})).into_response();
    r.extensions_mut().insert(LogNote {
        image: Some(id),
        ..Default::default()
    });
    Ok(r)
}

fn session_info(id: &str, e: &Entry, ttl: Duration) -> Value {
    let ts = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    let idle = e.last_used.elapsed();
    json!({
        "session_id": id,
        "name": e.name,
        "image": e.name,
        "dims": e.dims,
        "create_ts": ts(e.created),
        "last_access_ts": ts(std::time::SystemTime::now() - idle),
        "expiry": ttl.as_secs(),
        "resident": e.session.is_some(),
        "infers": e.infers,
    })
}

async fn create_session(
    State(st): State<Shared>,
    mp: std::result::Result<Multipart, MultipartRejection>,
) -> ApiResult<Response> {
    let parts = read_parts(mp, "PUT /session/").await?;
    let mut files: Vec<Part> = parts
        .into_iter()
        .filter(|p| p.file_name.is_some())
        .collect();
    if files.len() != 1 {
        return Err(ApiError::bad(format!(
            "PUT /session/: expected one image file part (`files`), found {}",
            files.len()
        )));
    }
    let id = random_id(&st);
    let entry = add_image(&st, id.clone(), Kind::Session, files.remove(0)).await?;
    let ttl = st.table.lock().ttl;
    let info = session_info(&id, &entry, ttl);
    insert(&st, &id, entry)?;
    let mut r = Json(json!({"session_id": id, "session_info": info})).into_response();
    r.extensions_mut().insert(LogNote {
        image: Some(id),
        ..Default::default()
    });
    Ok(r)
}

async fn get_session(
    State(st): State<Shared>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<Value>> {
    let mut t = st.table.lock();
    let ttl = t.ttl;
    match t.entries.get_mut(&id).filter(|e| e.kind == Kind::Session) {
        Some(e) => Ok(Json(session_info(&id, e, ttl))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "session `{}` not found (expired, evicted or never created)",
                segvol::error::clip(&id)
            ),
        )),
    }
}

async fn remove_session(
    State(st): State<Shared>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<Value>> {
    let mut t = st.table.lock();
    let ttl = t.ttl;
    let info = match t.entries.get(&id).filter(|e| e.kind == Kind::Session) {
        Some(e) => session_info(&id, e, ttl),
        None => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("session `{}` not found", segvol::error::clip(&id)),
            ))
        }
    };
    t.remove(&id);
    Ok(Json(info))
}

#[derive(Deserialize)]
struct InferQuery {
    image: Option<String>,
    session_id: Option<String>,
    output: Option<String>,
}

/// What one infer computed, sent back from the engine thread.
struct Computed {
    file: Vec<u8>,
    voxels: usize,
    session_opened: bool,
    windows: usize,
    cached_windows: usize,
    queue_s: f64,
    compute_s: f64,
}

async fn infer(
    State(st): State<Shared>,
    UrlPath(model): UrlPath<String>,
    q: std::result::Result<Query<InferQuery>, axum::extract::rejection::QueryRejection>,
    mp: std::result::Result<Multipart, MultipartRejection>,
) -> ApiResult<Response> {
    if model != MODEL {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "model `{}` not found (this server has one model: `{MODEL}`)",
                segvol::error::clip(&model)
            ),
        ));
    }
    let Query(q) = q.map_err(|e| ApiError::bad(format!("query: {e}")))?;
    let output = match q.output.as_deref() {
        None | Some("") | Some("all") => "all",
        Some("image") => "image",
        Some("json") => "json",
        Some(o) => {
            return Err(ApiError::bad(format!(
                "output `{}` is not supported (image, json, all)",
                segvol::error::clip(o)
            )))
        }
    };
    let parts = read_parts(mp, "POST /infer").await?;
    if parts.iter().any(|p| p.name == "file") {
        return Err(ApiError::bad(
            "POST /infer: an image `file` part is not supported; upload it first (PUT /datastore/?image=ID or PUT /session/) and infer by id",
        ));
    }
    let raw = match parts.iter().find(|p| p.name == "params") {
        None => String::new(),
        Some(p) => String::from_utf8(p.data.to_vec())
            .map_err(|_| ApiError::bad("params: not UTF-8 text"))?,
    };
    // A session id names the image (as MONAI Label's server takes the session's image).
    let id = match (
        q.session_id.filter(|s| !s.is_empty()),
        q.image.filter(|s| !s.is_empty()),
    ) {
        (Some(s), _) => s,
        (None, Some(i)) => i,
        (None, None) => {
            return Err(ApiError::bad(
                "POST /infer: give ?image=ID (an uploaded image) or &session_id=S",
            ))
        }
    };
    let dims = {
        let mut t = st.table.lock();
        let e = t.entries.get_mut(&id).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "image `{}` not found: upload it first (PUT /datastore/?image=ID or PUT /session/); images expire after the TTL",
                    segvol::error::clip(&id)
                ),
            )
        })?;
        e.last_used = Instant::now();
        e.dims
    };
    let p = params::parse(&raw, dims).map_err(ApiError::bad)?;
    let note = LogNote {
        image: Some(id.clone()),
        prompts: Some(p.kinds.join("+")),
        ..Default::default()
    };
    let user = p
        .prompts
        .resolve(dims, None)
        .map_err(|e| ApiError::bad(format!("params: {e}")))?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no prompt resolved"))?;

    let (tx, rx) = tokio::sync::oneshot::channel::<Result<Computed>>();
    let cancelled = Arc::new(AtomicBool::new(false));
    let (table, eng, format) = (st.table.clone(), st.eng.clone(), p.format);
    let job_id = id.clone();
    let tmp_dir = st.store.clone();
    let tmp_name = random_id(&st);
    let submitted = st.queue.submit(cancelled.clone(), move |waited| {
        let t0 = Instant::now();
        let r = (|| -> Result<Computed> {
            let (session, vol, opened) = state::resident_session(&table, &eng, &job_id)?;
            let out = session.segment(&user, &mut |_, _| {})?;
            let (voxels, windows, cached) = (out.voxels, out.windows.len(), out.cached_windows);
            let mask = session.outcome(vec![out]).mask(0);
            let file = match format {
                ResultFormat::Nrrd => segvol::io::nrrd::mask_bytes(&vol, &mask)?,
                ResultFormat::NiftiGz | ResultFormat::Nifti => {
                    // The NIfTI writer of `segvol segment`, on the uploaded image's header.
                    let path = tmp_dir.join(format!(".mask-{tmp_name}{}", format.extension()));
                    segvol::io::nifti::write_mask(&path, &vol, &mask)?;
                    let b = std::fs::read(&path).map_err(|e| Error::io(&path, e));
                    let _ = std::fs::remove_file(&path);
                    b?
                }
            };
            if let Some(e) = table.lock().entries.get_mut(&job_id) {
                e.infers += 1;
                e.last_used = Instant::now();
            }
            Ok(Computed {
                file,
                voxels,
                session_opened: opened,
                windows,
                cached_windows: cached,
                queue_s: waited.as_secs_f64(),
                compute_s: t0.elapsed().as_secs_f64(),
            })
        })();
        let _ = tx.send(r);
    });
    match submitted {
        Ok(()) => {}
        Err(QueueError::Full) => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the device queue is full ({} requests waiting); retry later",
                    st.queue.capacity
                ),
            );
            e.retry_after = Some(2);
            return Err(e);
        }
        Err(QueueError::Stopped) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the engine has stopped",
            ))
        }
    }
    let computed = match tokio::time::timeout(st.timeout, rx).await {
        Err(_) => {
            cancelled.store(true, Ordering::SeqCst);
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the request did not finish within {} s (--timeout)",
                    st.timeout.as_secs()
                ),
            ));
        }
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the engine dropped the request",
            ))
        }
        Ok(Ok(r)) => r.map_err(ApiError::from).map_err(|mut e| {
            e.detail = e.detail.replace(&st.store.display().to_string(), "<store>");
            e
        })?,
    };
    let label = p.text.clone().unwrap_or_else(|| "segvol".into());
    let result = json!({
        "label_names": {label: 1},
        "voxels": computed.voxels,
        "session": if computed.session_opened { "opened" } else { "reused" },
        "windows": computed.windows,
        "cached_windows": computed.cached_windows,
        "latencies": {"queue": computed.queue_s, "compute": computed.compute_s},
        "prompts": p.kinds,
    });
    let filename = format!("segvol-{}{}", random_id(&st), format.extension());
    let mut resp = match output {
        "json" => Json(result).into_response(),
        "image" => Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            )
            .body(Body::from(computed.file))
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
        _ => multipart_reply(&result, &filename, computed.file)?,
    };
    resp.extensions_mut().insert(LogNote {
        queue_s: Some(computed.queue_s),
        compute_s: Some(computed.compute_s),
        ..note
    });
    Ok(resp)
}

/// MONAI Label's infer reply: multipart/form-data with `params` (JSON) and `image` (the
/// file), as its `send_response` builds with `MultipartEncoder`; Slicer parses it with
/// `cgi.FieldStorage` and keeps the file part.
fn multipart_reply(params: &Value, filename: &str, file: Vec<u8>) -> ApiResult<Response> {
    let body_json = params.to_string();
    // A boundary that occurs in neither part.
    let mut boundary = format!("segvol-{}", filename.len());
    let mut n = 0u64;
    while contains(&file, boundary.as_bytes()) || body_json.contains(&boundary) {
        n += 1;
        boundary = format!("segvol-{n:016x}-{}", file.len());
    }
    let mut body = Vec::with_capacity(file.len() + body_json.len() + 512);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"params\"\r\nContent-Type: application/json\r\n\r\n{body_json}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Response::builder()
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(body))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
