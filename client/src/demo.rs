//! `fusion-client demo`: the whole system on one machine, over real mutual TLS.
//!
//! Ephemeral certificates, the server in-process on 127.0.0.1 port 0 with the bundled
//! model, then as a client: the model info, the public pool checked against its digest,
//! and a verified secure inference (Fusion's mix-and-check around backend `cheetah`,
//! labels only, as `fusion-client infer` runs it) of a few MNIST test images, printed
//! next to their true labels and the fixed-point evaluator's labels (which the demo can
//! compute because it holds the model too), with the cost table.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use fusion_common::fixed::eval_fixed;
use fusion_common::nn::mnist::{self, Split};
use fusion_common::nn::{Model, ModelDigest};
use fusion_server::runner::Registry;
use fusion_server::state::{Policy, ServedModel, ServerState, SessionLimits};
use serde::Serialize;

use crate::charts::{RunCost, write_report};
use crate::info_cmd::render_info;
use crate::local::{BUNDLED_MNIST, BUNDLED_MODEL, LocalServer, bundled};
use crate::report::{CostJson, render_tables};
use crate::verified::{FusionOptions, FusionSummary, PublicRows, run_verified};

/// Flags of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Model file to serve (default: the bundled model).
    #[arg(long, env = "FUSION_MODEL")]
    pub model: Option<PathBuf>,
    /// The directory of the MNIST gzip IDX files (default: the bundled data/mnist).
    #[arg(long, env = "FUSION_MNIST_DIR")]
    pub mnist_dir: Option<PathBuf>,
    /// MNIST test images to infer (the first ones of the test set; at most 64).
    #[arg(long, default_value_t = 8,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub images: usize,
    /// Print the results and the cost report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write report.json, report.md and the PNG chart of the costs into this directory.
    #[arg(long, env = "FUSION_REPORT_DIR")]
    pub report: Option<PathBuf>,
}

/// What `demo --json` prints.
#[derive(Debug, Serialize)]
struct DemoJson {
    fusion: FusionSummary,
    labels: Vec<usize>,
    evaluator_labels: Vec<usize>,
    true_labels: Vec<u8>,
    cost: CostJson,
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let say = |s: String| {
        if !args.json {
            println!("{s}");
        }
    };
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => bundled(BUNDLED_MODEL)
            .with_context(|| format!("no model file at {BUNDLED_MODEL}: pass --model"))?,
    };
    let dir = match &args.mnist_dir {
        Some(d) => d.clone(),
        None => bundled(BUNDLED_MNIST)
            .with_context(|| format!("no MNIST files at {BUNDLED_MNIST}: pass --mnist-dir"))?,
    };
    let n = args.images.clamp(1, 64);
    let full_test = mnist::load(&dir, Split::Test)?;
    let test = full_test.slice(0..n)?;

    // 1. the server, in-process, over TLS, with ephemeral certificates
    let model = Model::load(&model_path).context("loading the model")?;
    let served = ServedModel::new(
        &model_path
            .file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned()),
        model.clone(),
    );
    let state = ServerState::new(Some(served), Policy::default(), SessionLimits::default());
    let server = LocalServer::start(state, Registry::with_builtins()).await?;
    say(format!(
        "certificates  ephemeral CA, server (localhost, 127.0.0.1), client CN=client\n\
         server        listening on {} (TLS 1.3, client certificate required)",
        server.addr
    ));

    // 2. the client: what the server serves, its pool
    let client = server.client().await?;
    let info = client.model_info().await?;
    say(String::new());
    say(render_info(&info));
    if let Some(m) = info.model.as_ref().filter(|m| m.pool_size > 0) {
        let pool = client.public_pool().await?;
        let digest: [u8; 32] = m
            .model_digest
            .as_slice()
            .try_into()
            .context("model digest is not 32 bytes")?;
        pool.to_nn()?.verify(&ModelDigest(digest))?;
        say(format!(
            "public pool   {} entries received, digest verified against the model digest\n",
            pool.entries.len()
        ));
    }

    // 3. a verified secure inference of the first test images (labels only): Fusion
    //    mixes public pool rows and copies into one secret batch and checks them
    say(format!(
        "verified secure inference of MNIST test images 0..{n} (Fusion around backend cheetah, labels only)..."
    ));
    let public = PublicRows::fetch(&client, &info, &full_test).await?;
    let (fout, out) = run_verified(
        &client,
        &info,
        &public,
        test.images(),
        &FusionOptions::default(),
    )
    .await?;
    let fm = model.fixed_model();
    let evaluator = eval_fixed(fm, &fm.encode_images(test.images()))?.labels;
    let stats = server.handle.stats();
    server.shutdown().await?;

    let j = DemoJson {
        fusion: fout.summary(),
        labels: fout.labels.clone(),
        evaluator_labels: evaluator.clone(),
        true_labels: test.labels().to_vec(),
        cost: CostJson::from_report(&out.cost),
    };
    let written = match &args.report {
        Some(dir) => {
            let run = RunCost {
                label: format!("{} rows", fout.rows()),
                rows: Some(fout.rows()),
                cost: out.cost.clone(),
                link: None,
            };
            write_report(dir, "demo", &j, &[run])?
        }
        None => vec![],
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    print!("{}", fout.render());
    println!("\nimage  secure label  evaluator label  true label");
    for (i, ((s, e), t)) in fout
        .labels
        .iter()
        .zip(&evaluator)
        .zip(test.labels())
        .enumerate()
    {
        let mark = if s == e {
            ""
        } else {
            "  <- differs from the evaluator"
        };
        println!("{i:>5}  {s:>12}  {e:>15}  {t:>10}{mark}");
    }
    let same = fout.labels == evaluator;
    let right = fout
        .labels
        .iter()
        .zip(test.labels())
        .filter(|(a, b)| **a == usize::from(**b))
        .count();
    println!(
        "\nsecure labels {} the fixed-point evaluator's; {right} of {n} equal the true labels",
        if same { "equal" } else { "DIFFER FROM" }
    );
    println!(
        "\ncost of session {} (client side; setup once per session, online per batch)\n",
        out.session_id
    );
    print!("{}", render_tables(&out.cost));
    println!(
        "\nserver        {} session(s) accepted, {} finished cleanly, {} refused TLS handshakes",
        stats.sessions_accepted, stats.sessions_ok, stats.handshakes_failed
    );
    for p in written {
        println!("wrote {}", p.display());
    }
    if !same {
        anyhow::bail!("the secure labels differ from the fixed-point evaluator's");
    }
    Ok(())
}
