//! SIGINT and SIGTERM end a run cleanly: the temporary files of writes in progress are
//! removed ([`segvol::io::remove_pending_temp_files`]), so every output is either complete
//! under its final name or absent, and the exit status is 128 + the signal (130, 143), as
//! shells report. SIGKILL cannot be caught: it can leave `.<name>.tmp-<pid>` files beside the
//! outputs (docs/reliability.md).

/// What a long-running command (`segvol serve`) does on the first SIGINT/SIGTERM instead of
/// exiting: it drains its work and returns from `main`; a second signal exits as usual.
type Hook = Box<dyn Fn(&'static str) + Send + Sync>;
static FIRST_SIGNAL: std::sync::Mutex<Option<Hook>> = std::sync::Mutex::new(None);

/// Installs the first-signal hook ([`FIRST_SIGNAL`]); it runs on the signal thread, once.
pub fn on_first_signal(hook: Hook) {
    *FIRST_SIGNAL.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
}

/// Blocks SIGINT and SIGTERM in the calling thread and starts one thread that waits for them.
/// Call first in `main`, before any other thread exists: threads inherit the mask, so only the
/// waiter ever receives these signals, and it runs ordinary code (locks, files, messages)
/// rather than an async-signal handler.
pub fn install() {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; the calls only read and
    // write the local set and this thread's mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return; // Default dispositions stay: the run can still be stopped, only less cleanly.
        }
        set
    };
    let waiter = std::thread::Builder::new()
        .name("segvol-signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` is a valid initialised sigset_t and `sig` a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            let name = if sig == libc::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            let hook = FIRST_SIGNAL.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(hook) = hook {
                hook(name);
                continue;
            }
            let removed = segvol::io::remove_pending_temp_files();
            eprintln!(
                "segvol: interrupted by {name}: stopped; {removed} unfinished output file(s) removed, outputs already written are complete"
            );
            // _exit: no destructors or atexit handlers race the threads still running.
            // SAFETY: terminates the process; nothing runs after it.
            unsafe { libc::_exit(128 + sig) };
        });
    if waiter.is_err() {
        // No waiter: unblock, so the signals keep their default effect.
        // SAFETY: as above, on this thread's mask only.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}
