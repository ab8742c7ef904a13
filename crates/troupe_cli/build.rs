//! Compresses the `troupe` binary's debug sections (the line tables kept
//! for backtraces): about 100 MB uncompressed, a third of that compressed.
//! Backtraces read compressed sections as they are.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bins=-Wl,--compress-debug-sections=zlib");
    }
}
