//! Preemption: SIGTERM, SIGINT, SIGUSR1 and SIGHUP (Slurm's `--signal`, time limits, scancel,
//! Ctrl-C, `kill -USR1` of mpirun, which forwards it, a closed terminal) only set a flag; the
//! handler does nothing else.
//! The step loop reads the flag once per step. Every rank's flag travels with the per-step NaN
//! check, so all ranks see a signal that reached any one of them in the same step. They finish
//! that step, write the checkpoint and exit with [`EXIT_PREEMPTED`].
//! A second SIGINT or SIGTERM while the first is being handled ends the process at once (the
//! default action), as a second Ctrl-C should.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Exit code of a run stopped by a signal after writing its checkpoint (BSD's EX_TEMPFAIL:
/// "try again later"), for requeue scripts: resume it.
pub const EXIT_PREEMPTED: u8 = 75;

static PENDING: AtomicI32 = AtomicI32::new(0);
static DUMP_ON_STOP: AtomicBool = AtomicBool::new(false);

/// SIGHUP (the terminal closed) stops gracefully too, unless the process was started to ignore
/// it (`nohup`), which stays so.
const SIGNALS: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGHUP];

extern "C" fn on_signal(sig: libc::c_int) {
    // A stop may be the launcher tearing down a job whose rank died: leave a flight-recorder
    // dump (written by a thread, not here) while there is time.
    if sig != libc::SIGUSR1 && DUMP_ON_STOP.load(Ordering::Relaxed) {
        fabbrica_comm::flight::request_dump_from_signal_handler(sig);
    }
    if PENDING.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst).is_err() && sig != libc::SIGUSR1 {
        // SAFETY: signal() and raise() are async-signal-safe; this restores the default action
        // (terminate) and delivers the signal again.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
}

/// The handlers while it lives; the previous ones come back on drop.
pub struct Handlers {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

/// Installs the handlers and clears any flag left from an earlier run in this process.
/// `dump_on_stop` (jobs of several ranks): SIGTERM/SIGINT also ask for a flight-recorder dump.
pub fn install(dump_on_stop: bool) -> Handlers {
    PENDING.store(0, Ordering::SeqCst);
    DUMP_ON_STOP.store(dump_on_stop, Ordering::SeqCst);
    let mut previous = Vec::new();
    for sig in SIGNALS {
        if sig == libc::SIGHUP && ignored(sig) {
            continue;
        }
        // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid; `old`
        // receives the previous action, restored on drop.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, &act, &mut old) == 0 {
                previous.push((sig, old));
            }
        }
    }
    Handlers { previous }
}

/// Whether `sig` is ignored now (inherited from `nohup`, say).
fn ignored(sig: libc::c_int) -> bool {
    // SAFETY: a null new action only reads the current one into `cur`.
    unsafe {
        let mut cur: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut cur) == 0 && cur.sa_sigaction == libc::SIG_IGN
    }
}

impl Drop for Handlers {
    fn drop(&mut self) {
        for (sig, old) in &self.previous {
            // SAFETY: restores the action saved by `install`.
            unsafe {
                libc::sigaction(*sig, old, std::ptr::null_mut());
            }
        }
    }
}

/// The first stop signal received since [`install`], if any.
pub fn pending() -> Option<i32> {
    Some(PENDING.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

pub fn name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGHUP => "SIGHUP".into(),
        s => format!("signal {s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_sets_the_flag_and_the_handlers_are_restored() {
        let h = install(false);
        assert_eq!(pending(), None);
        // SAFETY: raising SIGUSR1 at ourselves with our handler installed.
        unsafe { libc::raise(libc::SIGUSR1) };
        assert_eq!(pending(), Some(libc::SIGUSR1));
        // A second SIGUSR1 is only noted (it never ends the process).
        // SAFETY: as above: our handler for SIGUSR1 is still installed.
        unsafe { libc::raise(libc::SIGUSR1) };
        assert_eq!(pending(), Some(libc::SIGUSR1));
        drop(h);
        // SAFETY: sigaction is a plain C struct (integers, a mask, a handler address): all-zero is a
        // valid value.
        let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a null new action only queries; `cur` is a valid out-pointer.
        unsafe { libc::sigaction(libc::SIGUSR1, std::ptr::null(), &mut cur) };
        assert_ne!(cur.sa_sigaction, on_signal as *const () as usize, "handler not restored");
        assert_eq!(name(libc::SIGTERM), "SIGTERM");
    }
}
