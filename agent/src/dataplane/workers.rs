//! The L7 proxy's worker threads, one per CPU the agent may use, each running a single-threaded
//! runtime, as nginx and Envoy run one event loop per worker.
//!
//! Every worker accepts from its own `SO_REUSEPORT` listener (the kernel spreads connections over
//! them by their addresses), and a connection's request handlers, its upstream connections and
//! mirrors all run on the worker that accepted it. Nothing on the request path then needs a
//! work-stealing scheduler's cross-thread queues, wake-ups and atomics: in `cargo xtask bench
//! l7`, one single-threaded worker served about 15 % more requests per CPU-second than a
//! one-thread work-stealing runtime. The agent's control plane (sources, compiler, admin) keeps
//! its own runtime, so a recompile never stalls requests.
//!
//! Upstream connection pools are kept per worker ([`current`] picks the slot), so a pooled
//! connection is reused by the worker whose runtime drives it.

use std::cell::Cell;
use std::io;
use std::sync::OnceLock;
use std::thread::JoinHandle;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How many proxy workers this process runs (1 until [`ProxyWorkers::start`]); sizes the
/// per-worker upstream pools.
static COUNT: OnceLock<usize> = OnceLock::new();

thread_local! {
    /// This thread's worker index; 0 on threads that are not proxy workers (the control
    /// runtime serves gateways and tests from slot 0).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The number of per-worker slots pools keep.
pub fn count() -> usize {
    COUNT.get().copied().unwrap_or(1)
}

/// The calling thread's worker slot, below [`count`].
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// The running workers; dropping this stops them (their connections close).
pub struct ProxyWorkers {
    handles: Vec<Handle>,
    stop: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl ProxyWorkers {
    /// Starts `count` workers (at least one). Only the first call in a process sets the pool slot
    /// count; later calls (tests) must not ask for more workers than that.
    pub fn start(count: usize) -> io::Result<Self> {
        let count = count.max(1);
        let slots = *COUNT.get_or_init(|| count);
        assert!(
            count <= slots,
            "{count} proxy workers started after {slots} were"
        );
        let mut workers = ProxyWorkers {
            handles: Vec::with_capacity(count),
            stop: Vec::with_capacity(count),
            threads: Vec::with_capacity(count),
        };
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            workers.handles.push(runtime.handle().clone());
            workers.stop.push(stop);
            let thread = std::thread::Builder::new()
                .name(format!("steerd-proxy-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    // Returns when the sender is dropped; dropping the runtime then cancels the
                    // worker's tasks on this thread.
                    let _ = runtime.block_on(stopped);
                })?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// The workers' runtimes, to spawn each worker's accept loop on.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for ProxyWorkers {
    fn drop(&mut self) {
        self.stop.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_runs_on_its_own_thread_with_its_own_slot() {
        let workers = ProxyWorkers::start(2).unwrap();
        let slots = count();
        let seen: Vec<(usize, String)> = workers
            .handles()
            .iter()
            .map(|h| {
                let (tx, rx) = std::sync::mpsc::channel();
                h.spawn(async move {
                    let name = std::thread::current().name().unwrap_or("").to_string();
                    tx.send((current(), name)).unwrap();
                });
                rx.recv().unwrap()
            })
            .collect();
        assert!(slots >= 2, "slots {slots}");
        assert_eq!(
            seen,
            vec![
                (0, "steerd-proxy-0".to_string()),
                (1, "steerd-proxy-1".to_string())
            ]
        );
        assert_eq!(current(), 0, "the test thread is not a worker");
        drop(workers);
    }
}
