//! `fusion-server certs`: a CA, a server certificate and client certificates.

use std::path::PathBuf;

use clap::Args;
use fusion_common::net::certs::{CertSpec, generate};

/// Flags of `certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Directory to write into (created if missing).
    #[arg(long, env = "FUSION_CERTS_DIR")]
    pub out: PathBuf,
    /// Name the server certificate is valid for (DNS name or IP; repeat for more).
    #[arg(long = "server-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    pub server_names: Vec<String>,
    /// A client to issue a certificate for, written as NAME.pem / NAME.key (repeat for more).
    #[arg(long = "client", default_values_t = ["client".to_string()])]
    pub clients: Vec<String>,
    /// Validity in days (at least 1: 0 would make certificates that expire as they are
    /// made).
    #[arg(long, default_value_t = 365, value_parser = crate::cli::at_least_one::<u32>)]
    pub days: u32,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

/// Writes the files and lists them.
pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let spec = CertSpec {
        server_names: args.server_names,
        clients: args.clients,
        days: args.days,
    };
    let bundle = generate(&spec)?;
    let written = bundle.write_to(&args.out, args.force)?;
    for p in &written {
        println!("wrote {}", p.display());
    }
    println!(
        "server certificate for {}; the CA key was not kept (make a new set to add clients)",
        spec.server_names.join(", ")
    );
    Ok(())
}
