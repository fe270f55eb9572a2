//! What a new user meets at the command line, found in an audit of the README: arguments
//! the binaries refuse by name (exit status 2 at parsing, 1 before any connection) where
//! they were once taken silently (a port out of range meant 443, `--batch` was ignored
//! by Fusion, `--no-fusion` ignored `--t`/`--r`, `--max-rows 0` and `--idle-timeout 0`
//! made a server that fails every session, `demo --images 0` ran one image); key files
//! named in their errors; logs without colour codes off a terminal; and a run over the
//! client's budget refused before any session (`infer --no-fusion`, and Fusion through
//! the library), so that an honest server is not distrusted for ending a session over
//! its budget.

mod small;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use fusion_client::infer::InferError;
use fusion_client::trust::{FILE_NAME, TrustArgs, run_verified_trusted};
use fusion_client::verified::{FusionError, FusionOptions, Params, PublicRows, run_verified};
use fusion_common::nn::mnist::{self, Dataset, Split};
use fusion_server::state::Policy;
use fusion_tests::process::{Reaper, listening_port, serve_command};

fn server_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fusion-server-e2e"))
}

fn client_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fusion-client-e2e"))
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

/// Runs a binary without the caller's FUSION_* settings or backtraces.
fn run(bin: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FUSION_") {
            c.env_remove(k);
        }
    }
    c.args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Certificates made by `fusion-server certs` in a fresh directory.
fn certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().to_str().expect("a UTF-8 path");
    let o = run(&server_bin(), &["certs", "--out", out]);
    assert!(o.status.success(), "{}", stderr(&o));
    dir
}

#[test]
fn arguments_that_were_once_taken_silently_are_refused_by_name() {
    let conn = [
        "--server",
        "https://localhost:1",
        "--ca",
        "ca.pem",
        "--cert",
        "c.pem",
        "--key",
        "c.key",
    ];
    let with = |cmd: &str, extra: &[&str]| {
        let mut v = vec![cmd];
        v.extend_from_slice(&conn);
        v.extend_from_slice(extra);
        v.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let own = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    // `serve` with (unread) certificate paths and `flag` at 0
    let serve_zero = |flag: &str| {
        own(&[
            "serve",
            "--cert",
            "a",
            "--key",
            "b",
            "--client-ca",
            "c",
            flag,
            "0",
        ])
    };
    // (binary, arguments, what the message must name)
    let cases: Vec<(PathBuf, Vec<String>, &str)> = vec![
        (
            client_bin(),
            own(&[
                "info",
                "--server",
                "https://localhost:99999",
                "--ca",
                "a",
                "--cert",
                "b",
                "--key",
                "c",
            ]),
            "the port must be a number from 1 to 65535",
        ),
        (
            client_bin(),
            own(&[
                "info",
                "--server",
                "https://localhost:abc",
                "--ca",
                "a",
                "--cert",
                "b",
                "--key",
                "c",
            ]),
            "the port must be",
        ),
        (
            client_bin(),
            with(
                "infer",
                &[
                    "--mnist-test",
                    "0..2",
                    "--no-fusion",
                    "--t",
                    "3",
                    "--r",
                    "3",
                ],
            ),
            "cannot be used with",
        ),
        (
            client_bin(),
            with(
                "infer",
                &["--mnist-test", "0..2", "--no-fusion", "--confidence", "0.9"],
            ),
            "cannot be used with",
        ),
        (
            client_bin(),
            with("infer", &["--mnist-test", "0..2", "--confidence", "2"]),
            "--confidence",
        ),
        (
            client_bin(),
            with("infer", &["--mnist-test", "0..2", "--batch", "0"]),
            "--batch",
        ),
        (client_bin(), own(&["demo", "--images", "0"]), "--images"),
        (client_bin(), own(&["demo", "--images", "65"]), "--images"),
        (client_bin(), with("audit", &["--trials", "0"]), "--trials"),
        (
            client_bin(),
            with("audit", &["--per-session", "0"]),
            "--per-session",
        ),
        (server_bin(), serve_zero("--max-rows"), "--max-rows"),
        (server_bin(), serve_zero("--idle-timeout"), "--idle-timeout"),
        (
            server_bin(),
            own(&["certs", "--out", "unused", "--days", "0"]),
            "--days",
        ),
    ];
    for (bin, args, names) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(&bin, &args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert!(!Path::new("unused").exists(), "certs wrote nothing");
}

#[test]
fn key_files_without_a_key_or_with_another_key_are_named() {
    let dir = certs();
    let d = |f: &str| dir.path().join(f).to_str().unwrap().to_owned();
    std::fs::write(dir.path().join("garbage.key"), "not a key\n").unwrap();
    let info = |cert: &str, key: &str| {
        run(
            &client_bin(),
            &[
                "info",
                "--server",
                "https://localhost:1",
                "--ca",
                &d("ca.pem"),
                "--cert",
                &d(cert),
                "--key",
                &d(key),
            ],
        )
    };
    let o = info("client.pem", "garbage.key");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no PEM private key in the private key file"),
        "{}",
        stderr(&o)
    );
    let o = info("client.pem", "server.key");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("the private key does not match the certificate"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn the_servers_log_has_no_colour_codes_off_a_terminal() {
    let dir = certs();
    let mut child = serve_command(&server_bin(), dir.path())
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let serving = line.contains("serving");
            let _ = tx.send(line);
            if serving {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        let serving = line.contains("serving");
        lines.push(line);
        if serving {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().any(|l| l.contains("serving")),
        "the server logs that it serves: {lines:?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "no escape codes: {lines:?}"
    );
}

fn test_set() -> Dataset {
    mnist::load(repo("data/mnist"), Split::Test).expect("MNIST")
}

/// The first `n` test images' pixels.
fn images(test: &Dataset, n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| test.image(i).expect("image").to_vec())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fusion_run_over_the_budget_is_refused_before_any_session_and_not_distrusted() {
    let test = test_set();
    let policy = Policy {
        budget: Some(30),
        ..Policy::default()
    };
    let s = small::start(small::served(None), None, policy).await;
    let client = s.client().await;
    let info = client.model_info().await.unwrap();
    // Fusion: 2 + 2*14 = 30 rows fit, 2 + 2*15 = 32 do not; the trust store is untouched
    let dir = tempfile::tempdir().unwrap();
    let trust = TrustArgs {
        store: Some(dir.path().to_path_buf()),
        trust_again: false,
    };
    let opts = FusionOptions {
        params: Params::Fixed { t: 2, r: 2 },
        ..FusionOptions::default()
    };
    let public = PublicRows::fetch(&client, &info, &test).await.unwrap();
    let e = run_verified_trusted(&trust, &client, &info, &public, &images(&test, 15), &opts)
        .await
        .unwrap_err();
    let fe = e.downcast_ref::<FusionError>().expect("a Fusion error");
    assert!(
        matches!(
            fe,
            FusionError::Infer(InferError::OverBudget {
                rows: 32,
                remaining: 30
            })
        ),
        "{e}"
    );
    assert_eq!(s.handle.stats().sessions_accepted, 0, "no session started");
    assert!(!dir.path().join(FILE_NAME).exists(), "nothing recorded");
    // what fits runs, and uses up the budget exactly
    let (v, _) = run_verified_trusted(&trust, &client, &info, &public, &images(&test, 14), &opts)
        .await
        .expect("30 rows fit the budget");
    assert_eq!(v.labels.len(), 14);
    let info = client.model_info().await.unwrap();
    assert_eq!(info.budget.remaining(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_flag_bounds_the_rows_of_each_fusion_batch() {
    let test = test_set();
    let s = small::start(small::served(None), None, Policy::default()).await;
    let client = s.client().await;
    let info = client.model_info().await.unwrap();
    assert_eq!(info.max_rows, 1024);
    let public = PublicRows::fetch(&client, &info, &test).await.unwrap();
    let mut opts = FusionOptions {
        params: Params::Fixed { t: 2, r: 2 },
        ..FusionOptions::default()
    };
    opts.infer.batch_rows = Some(40);
    // 2 + 2*25 = 52 rows > 40: at most 19 inputs per batch, so 2 batches (13 + 12)
    let (v, _) = run_verified(&client, &info, &public, &images(&test, 25), &opts)
        .await
        .expect("an honest server passes");
    let sizes: Vec<(usize, usize)> = v
        .batches
        .iter()
        .map(|b| (b.setting.b, b.setting.rows))
        .collect();
    assert_eq!(sizes, [(13, 28), (12, 26)]);
    // a batch that cannot fit names the limit
    opts.infer.batch_rows = Some(3);
    let e = run_verified(&client, &info, &public, &images(&test, 1), &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(e, FusionError::TooManyRows { rows: 4, max: 3 }),
        "{e}"
    );
    assert!(e.to_string().contains("--batch"), "{e}");
}

/// `fusion-server serve` of the small model with `extra` flags, on port 0; its port.
fn serve(dir: &Path, extra: &[&str]) -> (Reaper, String) {
    let child = serve_command(&server_bin(), dir)
        .args(extra)
        .arg("--model")
        .arg(repo("models/mnist-784-32-10.safetensors"))
        .arg("--mnist-dir")
        .arg(repo("data/mnist"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the server starts");
    let mut reaper = Reaper(child);
    let port = listening_port(&mut reaper);
    (reaper, port)
}

#[test]
fn a_bare_run_over_the_budget_is_refused_before_any_session_and_not_distrusted() {
    let dir = certs();
    let (_server, port) = serve(dir.path(), &["--budget", "30"]);
    let d = |f: &str| dir.path().join(f).to_str().unwrap().to_owned();
    let infer = |range: &str| {
        run(
            &client_bin(),
            &[
                "infer",
                "--no-fusion",
                "--mnist-test",
                range,
                "--server",
                &format!("https://localhost:{port}"),
                "--ca",
                &d("ca.pem"),
                "--cert",
                &d("client.pem"),
                "--key",
                &d("client.key"),
                "--trust-store",
                &d("trust"),
                "--mnist-dir",
                repo("data/mnist").to_str().unwrap(),
            ],
        )
    };
    let o = infer("0..31");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("this run needs 31 rows and this client's budget has 30 left"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("trust").join(FILE_NAME).exists());
    // the budget is whole: 30 rows still run
    let o = infer("0..30");
    assert!(o.status.success(), "{}", stderr(&o));
}
