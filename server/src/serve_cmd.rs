//! `fusion-server serve`: the model owner's long-running service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use fusion_common::net::frame::DEFAULT_MAX_MESSAGE;
use fusion_common::net::stream::inbound_bytes;
use fusion_common::net::tls::{Identity, read, server_config};
use fusion_common::net::{DEFAULT_FRAME_LIMIT, FrameLimits, OutputMode};
use tracing::info;

use crate::cli::at_least_one;
use crate::runner::Registry;
use crate::server::spawn;
use crate::state::{ClientMemory, DEFAULT_BUDGET, Policy, ServerState, SessionLimits};

/// Flags of `serve` (each also from the environment variable shown in `--help`).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (TLS only; port 0 picks a free port).
    #[arg(long, env = "FUSION_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Model file (safetensors, see `fusion-server train`). Without it only the
    /// diagnostic `echo` backend is meaningful.
    #[arg(long, env = "FUSION_MODEL")]
    pub model: Option<PathBuf>,
    /// The server's certificate chain (PEM).
    #[arg(long, env = "FUSION_CERT")]
    pub cert: PathBuf,
    /// The server's private key (PEM).
    #[arg(long, env = "FUSION_KEY")]
    pub key: PathBuf,
    /// CA certificate(s) that issue client certificates (PEM); clients must present one.
    #[arg(long = "client-ca", env = "FUSION_CLIENT_CA")]
    pub client_ca: PathBuf,
    /// Largest batch (rows) one session may declare.
    #[arg(long, env = "FUSION_MAX_ROWS", default_value_t = 1024,
          value_parser = at_least_one::<u64>)]
    pub max_rows: u64,
    /// Rows each client certificate may query in total, or `unlimited`.
    #[arg(long, env = "FUSION_BUDGET", default_value_t = RowBudget(Some(DEFAULT_BUDGET)))]
    pub budget: RowBudget,
    /// What leaves the protocol: `labels` (argmax inside 2PC) or `logits`.
    #[arg(long, env = "FUSION_OUTPUT", default_value = "labels")]
    pub output: OutputMode,
    /// Backends to offer, comma-separated (default: all available).
    #[arg(long, env = "FUSION_BACKENDS", value_delimiter = ',')]
    pub backends: Vec<String>,
    /// Largest frame payload accepted, bytes.
    #[arg(long, env = "FUSION_FRAME_LIMIT", default_value_t = DEFAULT_FRAME_LIMIT)]
    pub frame_limit: usize,
    /// Largest protocol message accepted, bytes. The default is 15 times the largest
    /// message of a 1,024-row batch (a session may hold about two such messages in
    /// flight, counted against --max-memory); raise it for batches of more than about
    /// 20,000 rows in the preprocessed linear mode.
    #[arg(long, env = "FUSION_MAX_MESSAGE", default_value_t = DEFAULT_MAX_MESSAGE)]
    pub max_message: usize,
    /// Seconds a session may wait for its client before it is ended.
    #[arg(long, env = "FUSION_IDLE_TIMEOUT", default_value_t = 600,
          value_parser = at_least_one::<u64>)]
    pub idle_timeout: u64,
    /// Sessions running at once.
    #[arg(long, env = "FUSION_MAX_SESSIONS", default_value_t = 32,
          value_parser = at_least_one::<usize>)]
    pub max_sessions: usize,
    /// Sessions one client certificate may run at once.
    #[arg(long, env = "FUSION_MAX_CLIENT_SESSIONS", default_value_t = 4,
          value_parser = at_least_one::<usize>)]
    pub max_client_sessions: usize,
    /// Memory the running sessions may hold together, by each backend's estimate plus
    /// what a client may have in flight to the session, which every session is charged
    /// (215 MiB under the default --max-message: an `echo` session counts that; a
    /// `cheetah` session of 1,024-row batches about 890 MiB), in MiB; `auto`: three
    /// quarters of the machine's memory (or of its cgroup's limit: a container's, a
    /// systemd unit's); `unlimited`. A session over the whole cap is refused
    /// (RESOURCE_EXHAUSTED), one that does not fit beside the running ones is refused as
    /// busy (UNAVAILABLE).
    #[arg(long, env = "FUSION_MAX_MEMORY", default_value_t = MemoryCap::Auto)]
    pub max_memory: MemoryCap,
    /// How much of the memory cap the running sessions of one client certificate may
    /// hold together: `half` (of --max-memory), a number of MiB, or `all` (no share). A
    /// client holding none of the cap may always start one session that fits the cap.
    /// A session over its client's share is refused as busy (UNAVAILABLE).
    #[arg(long, env = "FUSION_MAX_CLIENT_MEMORY", default_value = "half",
          value_parser = parse_client_memory)]
    pub max_client_memory: ClientMemory,
    /// The accuracy announced to clients (Fusion's check (c)), in [0, 1]. Default:
    /// measured at start-up, the fixed-point accuracy on the public pool against the
    /// true MNIST labels (from --mnist-dir); without the MNIST test set, the held-out
    /// fixed-point accuracy recorded in the model file (with a warning).
    #[arg(long, env = "FUSION_CLAIMED_ACCURACY", value_parser = parse_accuracy)]
    pub claimed_accuracy: Option<f64>,
    /// The MNIST gzip IDX files (the test set the public pool indexes), for measuring the
    /// claimed accuracy at start-up.
    #[arg(long, env = "FUSION_MNIST_DIR", default_value = "data/mnist")]
    pub mnist_dir: PathBuf,
    /// EVALUATION ONLY: deviate from the protocol (wrong-model, flip-one, flip-rows:K,
    /// constant, replay, deviate-relu; optional @CLASS).
    #[cfg(feature = "adversary")]
    #[arg(long)]
    pub adversary: Option<crate::adversary::AdversarySpec>,
    /// EVALUATION ONLY: the weaker model `wrong-model` computes with (same architecture;
    /// default: the served model with most first-layer units switched off).
    #[cfg(feature = "adversary")]
    #[arg(long, requires = "adversary")]
    pub adversary_model: Option<PathBuf>,
}

fn parse_accuracy(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{v} is not in [0, 1]"));
    }
    Ok(v)
}

/// `--budget`: a number of rows, or `unlimited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowBudget(pub Option<u64>);

impl std::str::FromStr for RowBudget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "unlimited" | "none" => Ok(Self(None)),
            n => n
                .parse()
                .map(|v| Self(Some(v)))
                .map_err(|_| format!("{s:?} is not a number of rows (or `unlimited`)")),
        }
    }
}

impl std::fmt::Display for RowBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("unlimited"),
            Some(n) => write!(f, "{n}"),
        }
    }
}

/// `--max-memory`: MiB, `auto` or `unlimited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryCap {
    /// three quarters of the machine's memory (no cap where it cannot be read)
    Auto,
    /// no cap
    Unlimited,
    /// this many MiB
    Mib(u64),
}

impl std::str::FromStr for MemoryCap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "unlimited" | "none" => Ok(Self::Unlimited),
            n => match n.parse() {
                Ok(0) | Err(_) => Err(format!(
                    "{s:?} is not a positive number of MiB (or `auto`, `unlimited`)"
                )),
                Ok(v) => Ok(Self::Mib(v)),
            },
        }
    }
}

impl std::fmt::Display for MemoryCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Unlimited => f.write_str("unlimited"),
            Self::Mib(n) => write!(f, "{n}"),
        }
    }
}

/// `--max-client-memory`: `half`, MiB or `all`.
fn parse_client_memory(s: &str) -> Result<ClientMemory, String> {
    match s.trim() {
        "half" => Ok(ClientMemory::Half),
        "all" | "whole" => Ok(ClientMemory::Whole),
        n => match n.parse::<u64>() {
            Ok(v) if v > 0 => Ok(ClientMemory::Bytes(v.saturating_mul(1 << 20))),
            _ => Err(format!(
                "{s:?} is not a positive number of MiB (or `half`, `all`)"
            )),
        },
    }
}

impl MemoryCap {
    /// The cap in bytes (`None`: no cap); `auto` reads the machine's memory with
    /// `total_memory`.
    pub fn bytes(self, total_memory: impl FnOnce() -> Option<u64>) -> Option<u64> {
        match self {
            Self::Auto => total_memory().map(|t| t / 4 * 3),
            Self::Unlimited => None,
            Self::Mib(n) => Some(n.saturating_mul(1 << 20)),
        }
    }
}

/// The machine's memory in bytes: `MemTotal` of `/proc/meminfo`, or the memory limit of
/// this process's cgroups where that is lower (a container's, or a systemd unit's
/// `MemoryMax`; see [`cgroup_limit`]); `None` where neither is there.
pub fn machine_memory() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let total = read("/proc/meminfo").and_then(|t| parse_mem_total(&t));
    let cgroup = read("/proc/self/cgroup").and_then(|c| cgroup_limit(&c, read));
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// The lowest memory limit set on this process's cgroup or any of its ancestors (a
/// parent's limit binds too), from `/proc/self/cgroup` (`cgroup`) and the files `read`
/// gives: cgroup v2 `memory.max` below `/sys/fs/cgroup` or, on hybrid hosts,
/// `/sys/fs/cgroup/unified`; cgroup v1 `memory.limit_in_bytes` below
/// `/sys/fs/cgroup/memory`. The root of each mount is read too: inside a container with
/// its own cgroup namespace the path listed may not exist there and the container's own
/// cgroup is the root. `max` and v1's "unlimited" (2^63 rounded down to a page, or any
/// value of 2^62 or more) are no limit.
pub fn cgroup_limit(cgroup: &str, read: impl Fn(&str) -> Option<String>) -> Option<u64> {
    let mut files = Vec::new();
    for line in cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let (mounts, file): (&[&str], _) = if id == "0" && controllers.is_empty() {
            (&["/sys/fs/cgroup", "/sys/fs/cgroup/unified"], "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (&["/sys/fs/cgroup/memory"], "memory.limit_in_bytes")
        } else {
            continue;
        };
        // the path and each of its ancestors, down to the root ("")
        let path = path.trim_end_matches('/');
        let mut prefixes = vec![path];
        let mut p = path;
        while let Some(i) = p.rfind('/') {
            p = &p[..i];
            prefixes.push(p);
        }
        for m in mounts {
            for p in &prefixes {
                files.push(format!("{m}{p}/{file}"));
            }
        }
    }
    files
        .iter()
        .filter_map(|f| read(f))
        .filter_map(|t| t.trim().parse::<u64>().ok())
        .filter(|&v| v < 1 << 62)
        .min()
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut it = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = it.next()?.parse().ok()?;
    (it.next() == Some("kB")).then_some(kib.checked_mul(1024)?)
}

impl ServeArgs {
    fn policy(&self) -> Policy {
        Policy {
            backends: self.backends.clone(),
            max_rows: self.max_rows,
            output: self.output,
            budget: self.budget.0,
        }
    }

    fn limits(&self) -> SessionLimits {
        SessionLimits {
            frames: FrameLimits {
                frame_limit: self.frame_limit,
                max_message: self.max_message,
            },
            idle_timeout: Duration::from_secs(self.idle_timeout),
            max_sessions: self.max_sessions,
            max_client_sessions: self.max_client_sessions,
            max_memory: self.max_memory.bytes(machine_memory),
            max_client_memory: self.max_client_memory,
            ..SessionLimits::default()
        }
    }
}

/// Refuses a memory cap under what every session is charged for its transport's inbound
/// data ([`inbound_bytes`] of the frame limits): such a server would refuse every session.
fn check_memory_cap(limits: &SessionLimits) -> anyhow::Result<()> {
    let inbound = inbound_bytes(&limits.frames);
    match limits.max_memory {
        Some(cap) if cap < inbound => anyhow::bail!(
            "the memory cap of {} MiB is under the {} MiB every session is charged for the \
             inbound data its transport may hold (--max-message {} bytes): every session \
             would be refused; raise --max-memory or lower --max-message",
            cap >> 20,
            inbound.div_ceil(1 << 20),
            limits.frames.max_message
        ),
        _ => Ok(()),
    }
}

/// Runs the server until Ctrl-C or SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    fusion_common::net::install_crypto_provider();
    let identity = Identity::from_files(&args.cert, &args.key)?;
    let client_ca = read(&args.client_ca, "client CA")?;
    let tls = server_config(&identity, &client_ca).context("building the TLS configuration")?;
    let limits = args.limits();
    check_memory_cap(&limits)?;
    let mut state = ServerState::from_model_path(args.model.as_deref(), args.policy(), limits)
        .context("loading the model")?;
    if let Some(m) = &mut state.model {
        claim_accuracy(m, args.claimed_accuracy, &args.mnist_dir)?;
    }
    if let Some(m) = &state.model {
        info!(
            model = %m.summary.name,
            digest = %hex_digest(&m.summary.model_digest),
            pool = m.summary.pool_size,
            "model loaded"
        );
    }
    match state.limits.max_memory {
        Some(b) => info!(
            max_memory_mib = b >> 20,
            max_client_memory_mib = state.limits.max_client_memory.bytes(b) >> 20,
            "memory cap of the running sessions, and of one client's"
        ),
        None if args.max_memory == MemoryCap::Auto => tracing::warn!(
            "the machine's memory is unknown (no /proc/meminfo): sessions run without a memory cap (set --max-memory)"
        ),
        None => info!("no memory cap (--max-memory unlimited)"),
    }
    let registry = registry(&args, &state)?;
    let handle = spawn(args.listen, tls, state, registry).await?;
    // one line on stdout for scripts (and the tests) that bind port 0
    println!("fusion-server listening on {}", handle.local_addr());
    shutdown_signal().await;
    info!("shutting down");
    handle.shutdown().await?;
    Ok(())
}

/// Sets the accuracy the server announces (see `--claimed-accuracy`) and logs it.
fn claim_accuracy(
    m: &mut crate::state::ServedModel,
    given: Option<f64>,
    mnist_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use fusion_common::nn::mnist::{self, Split};
    let recorded = m.summary.claimed_accuracy;
    if let Some(a) = given {
        // the sample count stays the file's (a given figure is not measured here)
        let samples = m.summary.accuracy_samples;
        m.announce_accuracy(a, samples);
        info!(
            claimed_accuracy = a,
            recorded_heldout = recorded,
            "claimed accuracy from --claimed-accuracy (not measured)"
        );
        return Ok(());
    }
    if m.model.public_pool().is_none() {
        return Ok(());
    }
    match mnist::load(mnist_dir, Split::Test) {
        Ok(test) => {
            let a = m
                .measure_pool_accuracy(&test)
                .context("measuring the claimed accuracy on the public pool")?;
            m.announce_accuracy(a.accuracy(), a.images as u64);
            info!(
                claimed_accuracy = a.accuracy(),
                correct = a.correct,
                pool = a.images,
                recorded_heldout = recorded,
                "claimed accuracy measured on the public pool (fixed point, true MNIST labels)"
            );
        }
        Err(e) => tracing::warn!(
            claimed_accuracy = recorded,
            mnist_dir = %mnist_dir.display(),
            error = %e,
            "no MNIST test set: announcing the held-out accuracy recorded in the model file, NOT measured on the pool (pass --mnist-dir or --claimed-accuracy)"
        ),
    }
    Ok(())
}

#[cfg(not(feature = "adversary"))]
fn registry(_args: &ServeArgs, _state: &ServerState) -> anyhow::Result<Registry> {
    Ok(Registry::with_builtins())
}

#[cfg(feature = "adversary")]
fn registry(args: &ServeArgs, state: &ServerState) -> anyhow::Result<Registry> {
    use crate::adversary::{AdversaryError, AdversaryRunner};
    let Some(spec) = args.adversary else {
        return Ok(Registry::with_builtins());
    };
    let announced = &state.model.as_ref().ok_or(AdversaryError::NoModel)?.model;
    let wrong = args
        .adversary_model
        .as_deref()
        .map(fusion_common::nn::Model::load)
        .transpose()
        .context("loading the adversary's model")?;
    let runner = AdversaryRunner::new(spec, announced, wrong)?;
    tracing::warn!(adversary = %spec, "THIS SERVER CHEATS (evaluation build)");
    Ok(runner.registry())
}

fn hex_digest(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        let base = ["serve", "--cert", "c", "--key", "k", "--client-ca", "ca"];
        Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.serve)
    }

    #[test]
    fn the_default_policy_is_the_defended_one() {
        let p = parse(&[]).unwrap().policy();
        assert_eq!(p, Policy::default());
        assert_eq!(p.output, OutputMode::Labels);
        assert_eq!(p.budget, Some(DEFAULT_BUDGET));
        assert_eq!(p.max_rows, 1024);
        assert_eq!(
            parse(&["--budget", "unlimited"]).unwrap().policy().budget,
            None
        );
        assert_eq!(
            parse(&["--budget", "500"]).unwrap().policy().budget,
            Some(500)
        );
        assert!(parse(&["--budget", "-3"]).is_err());
        assert!(parse(&["--budget", "lots"]).is_err());
    }

    #[test]
    fn limits_that_would_refuse_or_time_out_every_session_are_refused_at_start() {
        // --max-rows 0 would refuse every batch, --idle-timeout 0 end every session at
        // its first wait (and a client distrusts a server whose session fails)
        for flag in ["--max-rows", "--idle-timeout"] {
            for bad in ["0", "-1", "x"] {
                assert!(parse(&[flag, bad]).is_err(), "{flag} {bad}");
            }
            let e = parse(&[flag, "0"]).unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
        assert_eq!(parse(&["--max-rows", "1"]).unwrap().policy().max_rows, 1);
        assert_eq!(
            parse(&["--idle-timeout", "1"])
                .unwrap()
                .limits()
                .idle_timeout,
            Duration::from_secs(1)
        );
    }

    /// A cap under the inbound charge of one session would refuse every session: refused
    /// at start, naming both flags; a cap that holds it, or none, is taken.
    #[test]
    fn a_memory_cap_under_one_sessions_inbound_charge_is_refused_at_start() {
        let inbound = inbound_bytes(&parse(&[]).unwrap().limits().frames);
        let e = check_memory_cap(&parse(&["--max-memory", "200"]).unwrap().limits())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--max-memory") && e.contains("--max-message"),
            "{e}"
        );
        assert!(inbound > 200 << 20, "{inbound}");
        check_memory_cap(&parse(&["--max-memory", "216"]).unwrap().limits()).unwrap();
        check_memory_cap(&parse(&["--max-memory", "unlimited"]).unwrap().limits()).unwrap();
        // a smaller --max-message lowers the charge
        let small = parse(&["--max-memory", "200", "--max-message", "33554432"]).unwrap();
        check_memory_cap(&small.limits()).unwrap();
    }

    #[test]
    fn the_memory_cap_is_three_quarters_of_the_machine_unless_given() {
        let mib = 1u64 << 20;
        let cap =
            |args: &[&str], total: Option<u64>| parse(args).map(|a| a.max_memory.bytes(|| total));
        assert_eq!(cap(&[], Some(24 << 30)).unwrap(), Some(18 << 30));
        assert_eq!(cap(&[], None).unwrap(), None);
        assert_eq!(
            cap(&["--max-memory", "2048"], Some(1)).unwrap(),
            Some(2048 * mib)
        );
        assert_eq!(
            cap(&["--max-memory", "unlimited"], Some(24 << 30)).unwrap(),
            None
        );
        for bad in ["0", "-1", "lots", "1.5"] {
            assert!(parse(&["--max-memory", bad]).is_err(), "{bad}");
        }
        let a = parse(&["--max-memory", "3000"]).unwrap();
        assert_eq!(a.limits().max_memory, Some(3000 * mib));
        // and one client runs at most 4 sessions at once unless told otherwise
        assert_eq!(a.limits().max_client_sessions, 4);
        let a = parse(&["--max-client-sessions", "2"]).unwrap();
        assert_eq!(a.limits().max_client_sessions, 2);
        // /proc/meminfo's line, in kB
        let text = "MemFree:  100 kB\nMemTotal:       24589416 kB\nBuffers: 1 kB\n";
        assert_eq!(parse_mem_total(text), Some(24_589_416 * 1024));
        assert_eq!(parse_mem_total("MemTotal: 12 MB\n"), None);
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        if cfg!(target_os = "linux") {
            assert!(machine_memory().is_some_and(|b| b > 0));
        }
        // --max-client-sessions 0 would refuse every session, --max-sessions 0 too
        assert!(parse(&["--max-client-sessions", "0"]).is_err());
        for bad in ["0", "-1", "x"] {
            assert!(parse(&["--max-sessions", bad]).is_err(), "{bad}");
        }
        assert_eq!(a.limits().max_sessions, 32);
        assert_eq!(
            parse(&["--max-sessions", "1"])
                .unwrap()
                .limits()
                .max_sessions,
            1
        );
    }

    #[test]
    fn a_clients_share_is_half_the_memory_cap_unless_given() {
        let mib = 1u64 << 20;
        let share = |args: &[&str]| {
            parse(args).map(|a| {
                let l = a.limits();
                l.max_memory.map(|cap| l.max_client_memory.bytes(cap))
            })
        };
        let cap = ["--max-memory", "3000"];
        assert_eq!(share(&cap).unwrap(), Some(1500 * mib));
        let given = |v: &str| share(&[cap[0], cap[1], "--max-client-memory", v]);
        assert_eq!(given("half").unwrap(), Some(1500 * mib));
        assert_eq!(given("1000").unwrap(), Some(1000 * mib));
        assert_eq!(given("all").unwrap(), Some(3000 * mib));
        // a share above the cap is the cap
        assert_eq!(given("5000").unwrap(), Some(3000 * mib));
        for bad in ["0", "-5", "quarter", "0.5"] {
            assert!(given(bad).is_err(), "{bad}");
        }
        // no cap, no share
        assert_eq!(share(&["--max-memory", "unlimited"]).unwrap(), None);
    }

    #[test]
    fn the_cgroup_limit_is_the_lowest_on_the_path_to_the_root_of_either_version() {
        let fs = |files: &'static [(&'static str, &'static str)]| {
            move |p: &str| {
                files
                    .iter()
                    .find(|(f, _)| *f == p)
                    .map(|(_, t)| format!("{t}\n"))
            }
        };
        // v2, a systemd unit below a slice with the lower limit
        let v2 = "0::/system.slice/fusion.service\n";
        let files = fs(&[
            (
                "/sys/fs/cgroup/system.slice/fusion.service/memory.max",
                "max",
            ),
            ("/sys/fs/cgroup/system.slice/memory.max", "4294967296"),
        ]);
        assert_eq!(cgroup_limit(v2, files), Some(4 << 30));
        // a container with its own namespace: the listed path is not there, its root is
        let ns = fs(&[("/sys/fs/cgroup/memory.max", "2147483648")]);
        assert_eq!(cgroup_limit("0::/\n", ns), Some(2 << 30));
        assert_eq!(cgroup_limit("0::/docker/abc\n", ns), Some(2 << 30));
        // v1 (this machine's kind), hybrid with a v2 line: v1's "unlimited" is no limit
        let v1 = "4:memory:/process_api/x\n1:cpu:/\n0::/\n";
        let unlimited = fs(&[
            (
                "/sys/fs/cgroup/memory/process_api/x/memory.limit_in_bytes",
                "9223372036854771712",
            ),
            ("/sys/fs/cgroup/unified/memory.max", "max"),
        ]);
        assert_eq!(cgroup_limit(v1, unlimited), None);
        let limited = fs(&[
            (
                "/sys/fs/cgroup/memory/process_api/x/memory.limit_in_bytes",
                "9223372036854771712",
            ),
            (
                "/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes",
                "1073741824",
            ),
        ]);
        assert_eq!(cgroup_limit(v1, limited), Some(1 << 30));
        // nothing readable, or garbage
        assert_eq!(cgroup_limit(v1, fs(&[])), None);
        assert_eq!(cgroup_limit("garbage\n::\n", limited), None);
        let bad = fs(&[("/sys/fs/cgroup/memory.max", "lots")]);
        assert_eq!(cgroup_limit("0::/\n", bad), None);
    }

    fn repo(p: &str) -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(p)
    }

    #[test]
    fn the_claim_is_measured_on_the_pool_unless_given() {
        use crate::state::ServedModel;
        use fusion_common::nn::mnist::{self, Split};
        let path = repo("models/mnist-784-32-10.safetensors");
        let mut m = ServedModel::load(&path).unwrap();
        let pool = m.model.public_pool().unwrap().clone();
        claim_accuracy(&mut m, None, &repo("data/mnist")).unwrap();
        // recomputed here: the pool's published labels are the model's, so its
        // accuracy is the share of entries whose label is the true one
        let test = mnist::load(repo("data/mnist"), Split::Test).unwrap();
        let right = pool
            .entries()
            .filter(|&(i, l)| test.label(i as usize) == Some(l as u8))
            .count();
        assert_eq!(m.summary.accuracy_samples, pool.len() as u64);
        assert_eq!(m.summary.claimed_accuracy, right as f64 / pool.len() as f64);
        assert!(m.summary.claimed_accuracy > 0.5 && m.summary.claimed_accuracy < 1.0);
        // --claimed-accuracy overrides
        claim_accuracy(&mut m, Some(0.5), &repo("data/mnist")).unwrap();
        assert_eq!(m.summary.claimed_accuracy, 0.5);
        // without MNIST: the file's recorded figure
        let mut m = ServedModel::load(&path).unwrap();
        let recorded = m.summary.claimed_accuracy;
        claim_accuracy(&mut m, None, &repo("no-such-dir")).unwrap();
        assert_eq!(m.summary.claimed_accuracy, recorded);
        // a pool whose published labels are not the model's is refused
        let wrong: Vec<u32> = pool.labels.iter().map(|l| (l + 1) % 10).collect();
        let bad = fusion_common::nn::PublicPool::new(m.model.digest(), pool.indices.clone(), wrong)
            .unwrap();
        let m2 = ServedModel::new("bad", m.model.clone().with_public_pool(bad).unwrap());
        assert!(matches!(
            m2.measure_pool_accuracy(&test),
            Err(crate::state::AccuracyError::LabelMismatch { .. })
        ));
        // the bundled model's pool is its own labels too: measured without error
        let mut big = ServedModel::load(&repo("models/mnist-dnn.safetensors")).unwrap();
        claim_accuracy(&mut big, None, &repo("data/mnist")).unwrap();
        eprintln!(
            "bundled model: measured on the pool {}, recorded held-out {:?}",
            big.summary.claimed_accuracy,
            big.model.claimed_accuracy()
        );
        assert!(big.summary.claimed_accuracy > 0.9);
    }
}
