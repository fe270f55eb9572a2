//! `fusion-client`.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    fusion_client::cli::main()
}
