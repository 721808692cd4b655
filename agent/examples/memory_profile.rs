//! Where the agent's heap goes, stage by stage, for a directory of manifests (dev tool for
//! issue 6's memory target; `cargo xtask bench control` measures the real agent).
//!
//! ```sh
//! cargo run --release -p steerd --example memory_profile -- DIR [CHANGED_FILE]
//! ```
//!
//! It runs the agent's configuration pipeline without the kernel: the file source's first
//! load, the incremental compiler, the kernel tables, publishing to the admin views and
//! metrics, then (with CHANGED_FILE) one re-read of that file as a change. After each stage it
//! prints the live heap (bytes allocated and not freed, counted by a wrapping global allocator)
//! and the peak since the previous stage.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let now = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}

struct Stages {
    previous: usize,
    started: Instant,
}

impl Stages {
    fn mark(&mut self, stage: &str) {
        let live = LIVE.load(Ordering::Relaxed);
        let peak = PEAK.swap(live, Ordering::Relaxed);
        println!(
            "{stage:<48} live {:>8.1} MiB ({:>+8.1}), peak {:>8.1} MiB, {:>8.1} ms",
            mib(live),
            mib(live) - mib(self.previous),
            mib(peak),
            self.started.elapsed().as_secs_f64() * 1e3
        );
        self.previous = live;
        self.started = Instant::now();
    }
}

fn main() {
    let mut args = std::env::args_os().skip(1);
    let dir = PathBuf::from(
        args.next()
            .expect("usage: memory_profile DIR [CHANGED_FILE]"),
    );
    let changed = args.next().map(PathBuf::from);
    let mut stages = Stages {
        previous: 0,
        started: Instant::now(),
    };
    stages.mark("start");
    {
        use std::mem::size_of;
        use steerd::model::*;
        println!(
            "sizes: Resource<Service> {} B, Resource<EndpointSlice> {} B, Resource<Pod> {} B, \
             Object {} B, ServicePlan {} B, WeightedBackend {} B",
            size_of::<Resource<Service>>(),
            size_of::<Resource<EndpointSlice>>(),
            size_of::<Resource<Pod>>(),
            size_of::<Object>(),
            size_of::<steerd::compile::ServicePlan>(),
            size_of::<steerd::compile::WeightedBackend>(),
        );
    }

    per_kind(&dir);
    stages.mark("per-kind breakdown (dropped)");

    let mut source = steerd::sources::files::FileSource::new(&dir);
    let snapshot = source.load().expect("loading the manifests");
    println!(
        "{} objects, {} errors",
        snapshot.config.len(),
        snapshot.errors.len()
    );
    stages.mark("file source: first load (its copy + snapshot)");

    let mut compiler = steerd::compile::incremental::IncrementalCompiler::default();
    compiler.replace_source(0, snapshot.config);
    let dirty = compiler.take_dirty();
    stages.mark("compiler: first build (store + hosts + plan)");
    println!(
        "plan: {} services, {} diagnostics, {} sources",
        compiler.plan().services.len(),
        compiler.plan().diagnostics.len(),
        compiler.plan().sources.len()
    );
    if std::env::var_os("MEMORY_PROFILE_EXIT_AFTER_BUILD").is_some() {
        // Under heaptrack, what is still allocated at exit is what the first build holds.
        std::process::exit(0);
    }
    drop(dirty);
    stages.mark("drop the first write's dirty set");

    let tables = steerd::dataplane::kernel::tables(compiler.plan());
    stages.mark("kernel tables (transient in the first write)");
    drop(tables);

    let state = steerd::admin::AdminState::default();
    state.metrics.set_plan(compiler.plan());
    stages.mark("publish: metrics label index");
    state.publish(Arc::new(compiler.plan().clone()));
    stages.mark("publish: admin plan copy");

    let proxy_table = steerd::dataplane::proxy::ProxyTable::from_plan(compiler.plan());
    stages.mark("proxy table");
    drop(proxy_table);

    if let Some(file) = changed {
        let text = std::fs::read_to_string(&file).expect("reading the changed file");
        // The same content with the weights swapped (80/20 → 20/80) is one real change.
        let swapped = text
            .replace("weight: 80", "weight: X")
            .replace("weight: 20", "weight: 80")
            .replace("weight: X", "weight: 20");
        std::fs::write(&file, swapped).expect("writing the changed file");
        let started = Instant::now();
        let changes = source
            .reload(&[file.clone()].into_iter().collect())
            .expect("re-reading");
        let read = started.elapsed();
        let n = changes.len();
        compiler.apply(0, changes);
        let dirty = compiler.take_dirty();
        println!(
            "change: {n} object changes, {} services dirty, {} hosts; read {:.2} ms, apply {:.2} ms",
            dirty.services.len(),
            dirty.hosts,
            read.as_secs_f64() * 1e3,
            (started.elapsed() - read).as_secs_f64() * 1e3
        );
        stages.mark("one change");
        let started = Instant::now();
        state.metrics.set_plan(compiler.plan());
        state.publish(Arc::new(compiler.plan().clone()));
        println!(
            "publish after the change: {:.2} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        stages.mark("publish after the change");
        std::fs::write(&file, text).expect("restoring the changed file");
    }
    drop(state);
    stages.mark("drop the published copies");
    drop(compiler);
    stages.mark("drop the compiler");
    drop(source);
    stages.mark("drop the file source");
}

/// Heap bytes per object of each kind, over every manifest under `dir`.
fn per_kind(dir: &std::path::Path) {
    let snapshot = steerd::sources::files::load_paths(&[dir.to_path_buf()]).expect("loading");
    let mut config = snapshot.config;
    let live = || LIVE.load(Ordering::Relaxed);
    macro_rules! kind {
        ($field:ident) => {{
            let n = config.$field.len();
            let before = live();
            config.$field = Vec::new();
            if n > 0 {
                println!(
                    "  {:<24} {:>6} objects, {:>6} B each",
                    stringify!($field),
                    n,
                    (before - live()) / n
                );
            }
        }};
    }
    kind!(services);
    kind!(endpoint_slices);
    kind!(pods);
    kind!(virtual_services);
    kind!(destination_rules);
}
