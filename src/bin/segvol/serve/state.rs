//! The server's state: the images clients uploaded (datastore images and MONAI Label
//! sessions), each with its resident [`Session`] once it was first prompted, and the one
//! engine thread every piece of model work runs on.
//!
//! Memory: every image counts its host volume and, while resident, its session's planned
//! region plus its embedding-cache limit. Before a session opens, least recently used
//! sessions (and then volumes, which are re-read from the upload on demand) are dropped until
//! the new one fits the budget; images unused for the TTL are removed with their files.

use segvol::error::{Error, Result};
use segvol::io::nifti::Volume;
use segvol::pipeline::{self, plan, Engine, Session};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Points a session's arena is planned for up front (as `segvol session`); more grow it once.
const PLANNED_POINTS: usize = 16;

/// Which protocol object an image came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `PUT /datastore/?image=ID`.
    Datastore,
    /// `PUT /session/`.
    Session,
}

/// One uploaded image.
pub struct Entry {
    pub kind: Kind,
    /// The upload as received (kept so an evicted volume can be re-read).
    pub file: PathBuf,
    pub name: String,
    pub dims: [usize; 3],
    pub vol: Option<Arc<Volume>>,
    pub session: Option<Arc<Session<'static>>>,
    /// Bytes the session holds (planned region + cache limit) while resident.
    pub session_bytes: usize,
    pub created: std::time::SystemTime,
    pub last_used: Instant,
    /// Infers run on it.
    pub infers: u64,
}

impl Entry {
    fn volume_bytes(&self) -> usize {
        self.vol.as_ref().map_or(0, |v| v.data.len() * 4)
    }
    fn bytes(&self) -> usize {
        self.volume_bytes() + self.session_bytes
    }
}

/// Images by id, with the budget they are kept in.
pub struct Table {
    pub entries: HashMap<String, Entry>,
    pub budget: usize,
    pub ttl: Duration,
    pub max_images: usize,
    /// Sessions opened / evicted / expired since the start.
    pub opened: u64,
    pub evicted: u64,
    pub expired: u64,
}

impl Table {
    pub fn resident_bytes(&self) -> usize {
        self.entries.values().map(Entry::bytes).sum()
    }

    pub fn sessions(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.session.is_some())
            .count()
    }

    /// Removes images unused for the TTL (their files too); returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let ttl = self.ttl;
        let old: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| now.duration_since(e.last_used) > ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &old {
            self.remove(k);
            self.expired += 1;
        }
        old.len()
    }

    pub fn remove(&mut self, id: &str) -> Option<Entry> {
        let e = self.entries.remove(id)?;
        let _ = std::fs::remove_file(&e.file);
        if let Some(dir) = e.file.parent() {
            let _ = std::fs::remove_dir(dir);
        }
        Some(e)
    }

    /// Drops least recently used sessions, then volumes, of images other than `keep` until
    /// `extra` more bytes fit the budget. Returns false when they cannot.
    pub fn make_room(&mut self, extra: usize, keep: &str) -> bool {
        loop {
            if self.resident_bytes() + extra <= self.budget {
                return true;
            }
            let victim = self
                .entries
                .iter()
                .filter(|(k, e)| k.as_str() != keep && e.session.is_some())
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            if let Some(k) = victim {
                let e = self.entries.get_mut(&k).expect("victim is in the table");
                e.session = None;
                e.session_bytes = 0;
                self.evicted += 1;
                continue;
            }
            let victim = self
                .entries
                .iter()
                .filter(|(k, e)| k.as_str() != keep && e.vol.is_some())
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => self.entries.get_mut(&k).expect("victim").vol = None,
                None => return false,
            }
        }
    }

    /// Room for one more image entry: the least recently used image goes when the table is full.
    pub fn make_slot(&mut self) {
        while self.entries.len() >= self.max_images {
            let Some(k) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
            else {
                return;
            };
            self.remove(&k);
            self.evicted += 1;
        }
    }
}

/// A job for the engine thread, with when it was queued and whether its client gave up.
struct Job {
    queued: Instant,
    cancelled: Arc<AtomicBool>,
    work: Box<dyn FnOnce(Duration) + Send>,
}

/// The one device queue: a bounded channel into the engine thread.
pub struct DeviceQueue {
    tx: SyncSender<Job>,
    depth: Arc<AtomicUsize>,
    pub capacity: usize,
    busy: Arc<AtomicBool>,
}

/// Why a job could not be queued.
pub enum QueueError {
    Full,
    Stopped,
}

impl DeviceQueue {
    /// Starts the engine thread with room for `capacity` waiting jobs.
    pub fn start(capacity: usize) -> DeviceQueue {
        let (tx, rx) = sync_channel::<Job>(capacity);
        let depth = Arc::new(AtomicUsize::new(0));
        let busy = Arc::new(AtomicBool::new(false));
        let (d, b) = (depth.clone(), busy.clone());
        std::thread::Builder::new()
            .name("segvol-engine".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    d.fetch_sub(1, Ordering::SeqCst);
                    if job.cancelled.load(Ordering::SeqCst) {
                        continue;
                    }
                    b.store(true, Ordering::SeqCst);
                    (job.work)(job.queued.elapsed());
                    b.store(false, Ordering::SeqCst);
                }
            })
            .expect("spawning the engine thread");
        DeviceQueue {
            tx,
            depth,
            capacity,
            busy,
        }
    }

    /// Jobs waiting (not counting the one running).
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// Queues `work`, which is called on the engine thread with its queue wait; `cancelled`
    /// set before it starts skips it.
    pub fn submit(
        &self,
        cancelled: Arc<AtomicBool>,
        work: impl FnOnce(Duration) + Send + 'static,
    ) -> std::result::Result<(), QueueError> {
        self.depth.fetch_add(1, Ordering::SeqCst);
        let job = Job {
            queued: Instant::now(),
            cancelled,
            work: Box::new(work),
        };
        self.tx.try_send(job).map_err(|e| {
            self.depth.fetch_sub(1, Ordering::SeqCst);
            match e {
                TrySendError::Full(_) => QueueError::Full,
                TrySendError::Disconnected(_) => QueueError::Stopped,
            }
        })
    }
}

/// The resident model and how its sessions are sized.
pub struct EngineCfg {
    pub engine: Engine,
    pub cache_bytes: usize,
}

impl EngineCfg {
    /// The plan request of a resident session: a text of the longest the tokenizer allows and
    /// [`PLANNED_POINTS`] points, with the configured embedding cache.
    pub fn request(&self) -> plan::Request {
        plan::Request {
            prompts: 1,
            shares_budget: false,
            sparse_tokens: PLANNED_POINTS + 3,
            text_tokens: self.engine.model().config().text.max_positions,
            cache_bytes: self.cache_bytes,
        }
    }

    /// Bytes a session on a volume of model dims `dims` will hold: its planned region plus its
    /// cache limit (computed without allocating).
    pub fn session_bytes(&self, dims: [usize; 3]) -> Result<usize> {
        let model = self.engine.model();
        let opts = self.engine.options();
        let batch = if opts.zoom_in { opts.batch } else { 1 };
        let req = plan::Request {
            shares_budget: model.backend().free_memory().is_none(),
            ..self.request()
        };
        let p = plan::VolumePlan::fit(
            model.config(),
            model.backend().dtype(),
            dims,
            batch,
            opts.mem_limit,
            req,
        )?;
        Ok(p.volume_bytes + self.cache_bytes)
    }

    /// Opens a session (on the engine thread).
    pub fn open(&self, vol: &Volume) -> Result<Session<'static>> {
        self.engine
            .open(&vol.data, vol.model_dims(), self.request())
    }
}

/// The session of image `id`, opened (after making room) when it is not resident; also
/// whether it was opened now. Runs on the engine thread; the table lock is not held while the
/// model works.
pub fn resident_session(
    table: &parking_lot::Mutex<Table>,
    eng: &EngineCfg,
    id: &str,
) -> Result<(Arc<Session<'static>>, Arc<Volume>, bool)> {
    let (file, vol, session) = {
        let mut t = table.lock();
        let e = t
            .entries
            .get_mut(id)
            .ok_or_else(|| Error::Usage(format!("image `{id}` is gone (expired or evicted)")))?;
        e.last_used = Instant::now();
        (e.file.clone(), e.vol.clone(), e.session.clone())
    };
    let vol = match vol {
        Some(v) => v,
        None => {
            let v = Arc::new(segvol::io::read_input(&file)?);
            let mut t = table.lock();
            let need = v.data.len() * 4;
            if !t.make_room(need, id) {
                return Err(Error::OutOfMemory(format!(
                    "image `{id}`: its volume ({}) does not fit the server's memory budget ({})",
                    plan::human(need),
                    plan::human(t.budget)
                )));
            }
            if let Some(e) = t.entries.get_mut(id) {
                e.vol = Some(v.clone());
            }
            v
        }
    };
    if let Some(s) = session {
        return Ok((s, vol, false));
    }
    let need = eng.session_bytes(vol.model_dims())?;
    {
        let mut t = table.lock();
        if !t.make_room(need, id) {
            return Err(Error::OutOfMemory(format!(
                "image `{id}`: its session ({}) does not fit the server's memory budget ({}) beside its volume",
                plan::human(need),
                plan::human(t.budget)
            )));
        }
    }
    let s = Arc::new(eng.open(&vol)?);
    let mut t = table.lock();
    t.opened += 1;
    if let Some(e) = t.entries.get_mut(id) {
        e.session = Some(s.clone());
        e.session_bytes = s.plan().volume_bytes + eng.cache_bytes;
    }
    Ok((s, vol, true))
}

/// A memory budget for the table when none is given: the host's available memory less the
/// margin the pipeline keeps (cpu and emu run in host memory).
pub fn default_budget() -> usize {
    pipeline::host_available_memory()
        .unwrap_or(8 << 30)
        .saturating_sub(pipeline::MEMORY_MARGIN)
}
