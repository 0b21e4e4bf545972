//! The runtime layer (DESIGN.md "Layers"): everything about running programs that is not the
//! model. A [`Runtime`] owns
//!
//! - the compiled programs, cached per shape key and each built once ([`Runtime::program`]);
//! - the activation arena that every program of a request shares, grown in one place only
//!   ([`Runtime::reserve_arena`]) and sized up front from the request's plan;
//! - the staging buffer for small per-call inputs (decoder tokens, text embeddings);
//! - the CUDA-graph policy: capture a binding the second time it runs, replay it after, run a
//!   binding whose capture failed eagerly from then on;
//! - profiling (one synchronised timing per op).
//!
//! The model ([`crate::model`]) only builds programs and binds its typed inputs and outputs.

use crate::backend::kernel::DeviceGraph;
use crate::backend::{Addr, Backend, Buffer};
use crate::error::Result;
use crate::program::exec::{self, WeightTable};
use crate::program::planner::{self, Plan};
use crate::program::{Program, TensorId};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;

/// A program with its activation plan and its typed inputs and outputs (`io`, whatever the
/// builder returned: `EncoderIo`, `DecoderIo`, ...).
pub struct Compiled<K, Io> {
    pub key: K,
    pub program: Program,
    pub plan: Plan,
    pub io: Io,
}

/// Where a program runs: the backend (the model's, or its f32 twin for the text tower) and
/// the weights region its weight tensors live in.
#[derive(Clone, Copy)]
pub struct Lane<'a> {
    pub backend: &'a dyn Backend,
    pub weights: &'a dyn WeightTable,
}

/// One op's measured time ([`Runtime::run_profiled`]).
#[derive(Clone, Debug)]
pub struct OpTiming {
    pub program: String,
    pub label: String,
    pub kind: &'static str,
    pub seconds: f64,
    pub flops: f64,
}

/// Counters for tests and reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuntimeStats {
    /// Programs built, and programs in the cache: equal unless a key was built twice.
    pub builds: usize,
    pub programs: usize,
    /// Times the arena was (re)allocated.
    pub arena_allocations: usize,
    /// Graphs captured.
    pub captures: usize,
}

/// A program bound to concrete addresses: what a captured graph replays.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct GraphKey<K> {
    program: K,
    arena: Addr,
    externals: Vec<Addr>,
}

/// Graphs kept before the cache is emptied.
const MAX_GRAPHS: usize = 64;
/// Bindings remembered (runs seen, failed captures) before those sets are emptied.
const MAX_BINDINGS: usize = 1024;

/// CUDA graphs are on unless `SEGVOL_CUDA_GRAPHS=0` (for debugging a kernel eagerly).
fn graphs_enabled() -> bool {
    std::env::var("SEGVOL_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

struct State<K, Io> {
    programs: HashMap<K, Arc<Compiled<K, Io>>>,
    arena: Option<Buffer>,
    staging: Option<Buffer>,
    graphs: HashMap<GraphKey<K>, Box<dyn DeviceGraph>>,
    seen: HashMap<GraphKey<K>, u32>,
    /// Bindings whose capture failed: they run eagerly from then on, without another try.
    uncapturable: HashSet<GraphKey<K>>,
    stats: RuntimeStats,
}

/// Programs, arena, staging, graphs and profiling for one device (see the module docs).
pub struct Runtime<K, Io> {
    /// The device whose memory holds the arena and the staging buffer.
    backend: Arc<dyn Backend>,
    state: Mutex<State<K, Io>>,
}

impl<K: Copy + Eq + Hash + std::fmt::Debug, Io> Runtime<K, Io> {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Runtime {
            backend,
            state: Mutex::new(State {
                programs: HashMap::new(),
                arena: None,
                staging: None,
                graphs: HashMap::new(),
                seen: HashMap::new(),
                uncapturable: HashSet::new(),
                stats: RuntimeStats::default(),
            }),
        }
    }

    /// The program of `key`, built by `build` and planned the first time it is asked for.
    pub fn program(
        &self,
        key: K,
        build: impl FnOnce() -> (Program, Io),
    ) -> Result<Arc<Compiled<K, Io>>> {
        let mut st = self.state.lock();
        if let Some(c) = st.programs.get(&key) {
            return Ok(c.clone());
        }
        let (program, io) = build();
        let plan = planner::plan(&program)?;
        let c = Arc::new(Compiled {
            key,
            program,
            plan,
            io,
        });
        st.programs.insert(key, c.clone());
        st.stats.builds += 1;
        st.stats.programs = st.programs.len();
        Ok(c)
    }

    /// Counters so far.
    pub fn stats(&self) -> RuntimeStats {
        self.state.lock().stats
    }

    /// Bytes of the arena now held.
    pub fn arena_bytes(&self) -> usize {
        self.state.lock().arena.as_ref().map_or(0, |a| a.len())
    }

    /// Makes sure the arena holds at least `bytes`. The one place it grows: the old arena and
    /// every graph recorded into it are dropped first.
    pub fn reserve_arena(&self, bytes: usize) -> Result<()> {
        Self::grow_arena(&self.backend, &mut self.state.lock(), bytes)
    }

    fn grow_arena(backend: &Arc<dyn Backend>, st: &mut State<K, Io>, bytes: usize) -> Result<()> {
        if st.arena.as_ref().is_none_or(|a| a.len() < bytes) {
            st.graphs.clear();
            st.arena = None;
            st.arena = Some(backend.alloc(bytes.max(1))?);
            st.stats.arena_allocations += 1;
        }
        Ok(())
    }

    /// [`Runtime::run`] with small per-call inputs (decoder tokens, text embeddings): `bytes`
    /// go into a staging buffer that is kept and grown, so steady-state calls allocate nothing,
    /// and `bind` gives the external tensors from its address. Staging and launch happen under
    /// one lock: sessions on one model in several threads never run on each other's inputs
    /// (the upload is ordered with the kernels on the device's stream, so the next call's
    /// staging cannot overtake this call's reads).
    pub fn run_staged(
        &self,
        c: &Compiled<K, Io>,
        lane: Lane<'_>,
        bytes: &[u8],
        bind: impl FnOnce(Addr) -> Vec<(TensorId, Addr)>,
    ) -> Result<()> {
        let mut st = self.state.lock();
        if st.staging.as_ref().is_none_or(|b| b.len() < bytes.len()) {
            st.staging = None;
            st.staging = Some(
                self.backend
                    .alloc(bytes.len().next_power_of_two().max(4096))?,
            );
        }
        let addr = st.staging.as_ref().unwrap().addr();
        // SAFETY: the staging buffer holds at least `bytes.len()` bytes.
        unsafe { self.backend.upload(addr, bytes)? };
        let ext = bind(addr);
        self.run_locked(&mut st, c, lane, &ext)
    }

    /// Runs `c` on `lane` with its external tensors bound to `ext`: replays its graph if one
    /// was captured for exactly these addresses, captures one the second time the same binding
    /// runs (graphs remove the per-launch overhead; one-off bindings are not worth capturing),
    /// else runs the ops. The arena grows here only if the request's plan did not reserve it.
    pub fn run(&self, c: &Compiled<K, Io>, lane: Lane<'_>, ext: &[(TensorId, Addr)]) -> Result<()> {
        self.run_locked(&mut self.state.lock(), c, lane, ext)
    }

    fn run_locked(
        &self,
        st: &mut State<K, Io>,
        c: &Compiled<K, Io>,
        lane: Lane<'_>,
        ext: &[(TensorId, Addr)],
    ) -> Result<()> {
        Self::grow_arena(&self.backend, st, c.plan.arena_bytes)?;
        let arena = st.arena.as_ref().unwrap().addr();
        lane.backend.range_push(&c.program.name);
        let result = Self::run_bound(st, c, lane, arena, ext);
        lane.backend.range_pop();
        result
    }

    fn run_bound(
        st: &mut State<K, Io>,
        c: &Compiled<K, Io>,
        lane: Lane<'_>,
        arena: Addr,
        ext: &[(TensorId, Addr)],
    ) -> Result<()> {
        let backend = lane.backend;
        let key = GraphKey {
            program: c.key,
            arena,
            externals: ext.iter().map(|e| e.1).collect(),
        };
        if let Some(g) = st.graphs.get(&key) {
            // SAFETY: the graph was recorded for exactly these live buffers.
            return unsafe { g.launch() };
        }
        let bound = exec::bind(&c.program, &c.plan, arena, lane.weights, ext)?;
        if st.seen.len() > MAX_BINDINGS {
            st.seen.clear();
        }
        if st.uncapturable.len() > MAX_BINDINGS {
            st.uncapturable.clear();
        }
        let seen = st.seen.entry(key.clone()).or_insert(0);
        *seen += 1;
        if *seen >= 2 && graphs_enabled() && !st.uncapturable.contains(&key) {
            // SAFETY: as for the eager run below; the capture only records.
            match backend.capture(&mut || unsafe { exec::run(backend, &bound) }) {
                Ok(Some(g)) => {
                    // SAFETY: recorded for these live buffers.
                    unsafe { g.launch()? };
                    if st.graphs.len() >= MAX_GRAPHS {
                        st.graphs.clear();
                    }
                    st.graphs.insert(key, g);
                    st.stats.captures += 1;
                    return Ok(());
                }
                Ok(None) => {}
                // A capture only records, so nothing of the failed one ran: running the ops
                // eagerly below gives the same result. Graphs are an optimisation, so this
                // binding stays eager rather than failing the call or retrying every time.
                Err(e) => {
                    eprintln!(
                        "note: {}: graph capture of `{}` failed, running it without a graph: {e}",
                        backend.name(),
                        c.program.name
                    );
                    st.uncapturable.insert(key);
                }
            }
        }
        // SAFETY: the arena, the weights and the caller's buffers are live allocations of this
        // backend, and `bind` checked every operand against its tensor's extent.
        unsafe { exec::run(backend, &bound) }
    }

    /// Runs `c` once eagerly, synchronising after each op, and returns every op's wall time
    /// with its counted FLOPs (`segvol bench`).
    pub fn run_profiled(
        &self,
        c: &Compiled<K, Io>,
        lane: Lane<'_>,
        ext: &[(TensorId, Addr)],
    ) -> Result<Vec<OpTiming>> {
        let mut st = self.state.lock();
        Self::grow_arena(&self.backend, &mut st, c.plan.arena_bytes)?;
        let arena = st.arena.as_ref().unwrap().addr();
        let bound = exec::bind(&c.program, &c.plan, arena, lane.weights, ext)?;
        // SAFETY: as in `run_bound`.
        let times = unsafe { exec::run_timed(lane.backend, &bound)? };
        Ok(c.program
            .steps
            .iter()
            .zip(times)
            .map(|(s, t)| OpTiming {
                program: c.program.name.clone(),
                label: s.label.clone(),
                kind: s.op.kind(),
                seconds: t.as_secs_f64(),
                flops: s.op.flops(),
            })
            .collect())
    }
}
