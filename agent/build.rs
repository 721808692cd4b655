//! Compiles `ebpf/` for the BPF target with the nightly toolchain and bpf-linker (both installed
//! by `cargo xtask setup`) and leaves the object in OUT_DIR, where `include_bytes!` embeds it.
//! Only the `agent` feature has a data plane; without it (the fuzz targets) there is nothing
//! to build.
fn main() -> anyhow::Result<()> {
    #[cfg(feature = "agent")]
    {
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
        )?;
    }
    // Without it cargo would re-run this script whenever any file of the package changes.
    #[cfg(not(feature = "agent"))]
    println!("cargo:rerun-if-changed=build.rs");
    Ok(())
}
