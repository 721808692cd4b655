//! The `steerd` binary: CLI parsing and logging set-up; everything else lives in the library.

use anyhow::Result;
use clap::Parser;
use steerd::cli::{self, Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

// The L7 proxy allocates per request (hyper's buffers, header maps, futures); mimalloc's
// thread-local free lists make that several times cheaper than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("STEERD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// mimalloc commits its arenas up front where the OS overcommits (Linux), and then gives freed
/// pages back by resetting them (`MADV_FREE`), which leaves them in the agent's RSS until the
/// node runs short of memory; arenas committed on demand decommit what they purge instead. The
/// first plan's build peaks well above what the agent keeps (about 16 MiB more RSS after ready
/// at 10,000 services), so `run` wants that. mimalloc reads its options from the environment
/// before `main`, so `run` re-executes itself once with the option set (an operator's own
/// setting is kept). Returns only if there was nothing to do or the exec failed.
fn reexec_with_allocator_options() {
    use std::os::unix::process::CommandExt;
    const OPTION: &str = "MIMALLOC_ARENA_EAGER_COMMIT";
    if std::env::var_os(OPTION).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let error = std::process::Command::new(&exe)
        .arg0(argv0)
        .args(args)
        .env(OPTION, "0")
        .exec();
    eprintln!(
        "steerd: could not re-execute {} with {OPTION}=0 ({error}); continuing",
        exe.display()
    );
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            reexec_with_allocator_options();
            init_logging(args.log_format);
            let workers = cli::worker_threads(args.worker_threads);
            tracing::info!(workers, "L7 proxy worker threads");
            // The control plane (sources, compiler, admin) and the gateway listeners run here; the
            // L7 proxy has its own single-threaded workers (dataplane::workers).
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers.min(2))
                .enable_all()
                .build()?;
            runtime.block_on(cli::run::run(args))
        }
        Command::Maps {
            table,
            output,
            bpffs,
        } => {
            print!("{}", cli::maps::render(&bpffs, table, output)?);
            Ok(())
        }
        Command::Check { paths, output } => {
            let code = cli::check::check(&paths, output);
            std::process::exit(code);
        }
        Command::Explain(args) => {
            let code = cli::check::explain(&args);
            std::process::exit(code);
        }
        Command::Inspect {
            what,
            fqdn,
            port,
            subset,
            output,
            admin,
        } => {
            let filter = cli::inspect::Filter { fqdn, port, subset };
            print!("{}", cli::inspect::run(admin, what, &filter, output)?);
            Ok(())
        }
        Command::Cleanup { bpffs } => {
            init_logging(LogFormat::Text);
            let removed = steerd::dataplane::cleanup(&steerd::dataplane::Pins::new(&bpffs))?;
            println!("removed {removed} pins under {}", bpffs.display());
            Ok(())
        }
        Command::Version => {
            println!("steerd {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
