//! `fusion-server`.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    fusion_server::cli::main()
}
