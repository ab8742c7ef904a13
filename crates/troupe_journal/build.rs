//! Does nothing at build time. It exists so that the `[build-dependencies]`
//! in Cargo.toml take part in feature resolution: they give bindgen (RocksDB's
//! build script) the same dependency features in every configuration of the
//! workspace, the cluster one included, so RocksDB is compiled once.
fn main() {
    println!("cargo::rerun-if-changed=build.rs");
}
