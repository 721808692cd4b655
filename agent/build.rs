//! Compiles `ebpf/` for the BPF target with the nightly toolchain and bpf-linker (both installed
//! by `cargo xtask setup`) and leaves the object in OUT_DIR, where `include_bytes!` embeds it.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=STEERD_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("STEERD_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "steerd-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
