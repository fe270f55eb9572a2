//! `fusion-server` for the two-process tests: the same one-line `main` as
//! server/src/main.rs, built by `cargo test` in the same build as the tests (with the
//! tests' feature set), so no second build of the workspace is needed.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    fusion_server::cli::main()
}
