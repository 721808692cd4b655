//! `cargo xtask`: everything beyond plain cargo — machine set-up, the test suite, the demo and
//! the benchmarks.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

mod bench;
mod demo;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (idempotent): rust-src for nightly, bpf-linker built
    /// against nightly's LLVM, cargo-fuzz, iproute2/iptables, and a bpffs mount.
    Setup,
    /// Run every check and test: fmt, clippy, unit tests, real-kernel end-to-end tests, and
    /// each fuzz target for a bounded time (`STEERD_FUZZ_SECONDS` per target, default 20; 0
    /// skips fuzzing).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the cargo-fuzz targets (`fuzz/`) with the nightly toolchain, built under
    /// `$CARGO_TARGET_DIR/fuzz`; a crash, hang or out-of-memory fails the run and leaves its
    /// input in `fuzz/artifacts/TARGET/`.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = FUZZ_SECONDS)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Build the agent and run it over the bundled examples, steering real connections in
    /// throw-away network namespaces.
    Demo,
    /// Benchmarks; results go to BENCHMARKS.md.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

/// Minimum nightly the eBPF build is known to work with (rustc 1.97 with LLVM 22).
const MIN_NIGHTLY_MINOR: u32 = 97;
const LLVM_MAJOR: u32 = 22;
const EBPF_TOOLCHAIN: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz, pinned (`cargo install --locked` builds it with its own lock file).
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The fuzz targets (`fuzz/fuzz_targets/`), and how long `cargo xtask test` runs each.
const FUZZ_TARGETS: [&str; 2] = ["parse", "explain"];
const FUZZ_SECONDS: u64 = 20;

/// The workspace `cargo xtask` runs in: `cargo run` sets `CARGO_MANIFEST_DIR` at run time, which
/// is right even when this binary's build is shared with another checkout through one target
/// directory (the compile-time value is the fallback).
pub fn workspace_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Cargo's target directory for this workspace (`CARGO_TARGET_DIR`, else `target/`).
fn target_dir() -> PathBuf {
    let root = workspace_root();
    std::env::var_os("CARGO_TARGET_DIR")
        .map(|dir| root.join(dir))
        .unwrap_or_else(|| root.join("target"))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Checks the nightly toolchain by what it is, not by its name.
fn check_nightly() -> Result<PathBuf> {
    let verbose = output(Command::new("rustup").args(["run", EBPF_TOOLCHAIN, "rustc", "-vV"]))
        .context("the `nightly` toolchain is required for the eBPF build")?;
    let field = |name: &str| {
        verbose
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    let release = field("release:");
    let llvm = field("LLVM version:");
    let minor: u32 = release
        .split('.')
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let llvm_major: u32 = llvm
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if !release.contains("nightly") || minor < MIN_NIGHTLY_MINOR || llvm_major != LLVM_MAJOR {
        bail!(
            "toolchain `{EBPF_TOOLCHAIN}` is rustc {release} with LLVM {llvm}; the eBPF build needs a nightly >= 1.{MIN_NIGHTLY_MINOR} with LLVM {LLVM_MAJOR}"
        );
    }
    eprintln!("eBPF toolchain: rustc {release}, LLVM {llvm}");
    let sysroot = output(Command::new("rustup").args([
        "run",
        EBPF_TOOLCHAIN,
        "rustc",
        "--print",
        "sysroot",
    ]))?;
    Ok(PathBuf::from(sysroot.trim()))
}

fn setup() -> Result<()> {
    let sysroot = check_nightly()?;
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ]))?;
    }

    let linker_ok = output(Command::new("bpf-linker").arg("--version"))
        .is_ok_and(|v| v.contains(BPF_LINKER_VERSION));
    if !linker_ok {
        // bpf-linker must use the same LLVM as the nightly that emits the bitcode: link it
        // against the nightly's own libLLVM.
        let lib = sysroot.join("lib");
        let llvm_so = std::fs::read_dir(&lib)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with("libLLVM.so.")
                        || (n.starts_with("libLLVM-") && n.ends_with(".so"))
                })
            })
            .with_context(|| format!("no libLLVM in {}", lib.display()))?;
        let prefix = Path::new("/opt/rust-llvm");
        std::fs::create_dir_all(prefix.join("lib"))?;
        let link = prefix.join("lib/libLLVM.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm_so, &link)?;
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{LLVM_MAJOR}"))
            .env("LLVM_PREFIX", prefix)
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
            ))?;
    }

    let fuzz_ok = output(Command::new("cargo").args(["fuzz", "--version"]))
        .is_ok_and(|v| v.split_whitespace().nth(1) == Some(CARGO_FUZZ_VERSION));
    if !fuzz_ok {
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]))?;
    }

    let mut missing = Vec::new();
    for (program, package) in [
        ("ip", "iproute2"),
        ("iptables", "iptables"),
        ("nsenter", "util-linux"),
    ] {
        if !have(program) {
            missing.push(package);
        }
    }
    if !missing.is_empty() {
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing))?;
    }

    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    eprintln!("setup complete");
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    let root = workspace_root();
    run(Command::new("cargo")
        .args(["fmt", "--all", "--", "--check"])
        .current_dir(&root))?;
    // The fuzz crate is a workspace of its own, which `--all` does not reach.
    run(Command::new("cargo")
        .args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"])
        .current_dir(&root))?;
    run(Command::new("cargo")
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            "steerd-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(&root))?;
    // The end-to-end tests run the agent binary; build it first so they test this tree.
    run(Command::new("cargo")
        .args(["build", "-p", "steerd"])
        .current_dir(&root))?;
    // Hand the tests that binary: a test process building it again would do so with the
    // test crate's CARGO_* environment, which some build scripts treat as a change.
    run(Command::new("cargo")
        .args(["test", "--workspace", "--exclude", "steerd-ebpf"])
        .args(args)
        .env("STEERD_BIN", target_dir().join("debug/steerd"))
        .current_dir(&root))?;
    let seconds = match std::env::var("STEERD_FUZZ_SECONDS") {
        Ok(s) => s
            .parse()
            .with_context(|| format!("STEERD_FUZZ_SECONDS={s:?}: expected a number of seconds"))?,
        Err(_) => FUZZ_SECONDS,
    };
    if seconds > 0 {
        fuzz(seconds, &[])?;
    }
    Ok(())
}

/// How `cargo fuzz` builds the targets; `build` and `run` must agree or `run` rebuilds.
/// Under the workspace's target directory, so that `CARGO_TARGET_DIR` moves it too and no
/// second `fuzz/target` grows. No sanitizer: steerd's own code is safe Rust, and one would
/// slow both the build and every input of these bounded runs (a long hunt can add
/// `--sanitizer=address` by hand). 16 codegen units instead of cargo-fuzz's 1, for the
/// build's sake. Debug assertions and overflow checks stay on (cargo-fuzz's default).
fn fuzz_build_args() -> Vec<String> {
    vec![
        "--target-dir".into(),
        target_dir().join("fuzz").display().to_string(),
        "--sanitizer=none".into(),
        "--codegen-units=16".into(),
    ]
}

/// Builds the fuzz targets once, then runs each for `seconds`. The `parse` target is seeded
/// with Istio's samples and `fuzz/seeds/parse/` (read-only: libFuzzer adds what it finds to
/// the first directory, `fuzz/corpus/TARGET/`, which is not committed); the `explain` target
/// embeds the samples.
fn fuzz(seconds: u64, targets: &[String]) -> Result<()> {
    let root = workspace_root();
    let fuzz_dir = root.join("fuzz");
    let targets: Vec<&str> = if targets.is_empty() {
        FUZZ_TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    for t in &targets {
        if !FUZZ_TARGETS.contains(t) {
            bail!(
                "unknown fuzz target {t:?} (targets: {})",
                FUZZ_TARGETS.join(", ")
            );
        }
    }
    run(Command::new("cargo")
        .args(["+nightly", "fuzz", "build"])
        .args(fuzz_build_args())
        .current_dir(&root))?;
    let samples = root.join("../shared/istio/samples");
    for target in targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let mut cmd = Command::new("cargo");
        cmd.args(["+nightly", "fuzz", "run"])
            .args(fuzz_build_args())
            .arg(target)
            .arg(&corpus)
            .current_dir(&root);
        if target == "parse" {
            if samples.is_dir() {
                cmd.arg(&samples);
            }
            cmd.arg(fuzz_dir.join("seeds/parse"));
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // An input that takes this long is a hang, and fails the run like a crash.
            .arg("-timeout=30")
            // Short runs: mutate at full length from the start (samples are up to ~10 KB).
            .arg("-len_control=0")
            .arg(if target == "parse" {
                "-max_len=16384"
            } else {
                "-max_len=4096"
            })
            // A crash still prints its panic, input and artifact; the progress lines (thousands
            // per target) do not.
            .arg("-verbosity=0")
            .arg("-print_funcs=0")
            .arg("-print_final_stats=1");
        let dict = fuzz_dir.join(format!("{target}.dict"));
        if dict.is_file() {
            cmd.arg(format!("-dict={}", dict.display()));
        }
        run(&mut cmd).with_context(|| {
            format!(
                "fuzz target {target} failed: the input is in fuzz/artifacts/{target}/; reproduce with `cargo +nightly fuzz run {} {target} fuzz/artifacts/{target}/FILE`",
                fuzz_build_args().join(" ")
            )
        })?;
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup(),
        // Both set up first so each is the one command a fresh machine needs.
        Task::Test { args } => setup().and_then(|()| test(&args)),
        Task::Fuzz { seconds, targets } => setup().and_then(|()| fuzz(seconds, &targets)),
        Task::Demo => setup().and_then(|()| demo::run()),
        Task::Bench { which } => bench::run(which),
    }
}
