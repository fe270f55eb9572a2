//! The real binaries in two processes on loopback: `fusion-server certs` makes the
//! certificates, `fusion-server serve` (with the bundled model) listens on port 0 and
//! prints its address, `fusion-client info --json` asks it over mutual TLS and
//! `fusion-client infer --json` runs a secure inference (flags from the environment).
//!
//! The binaries belong to other packages, so `env!("CARGO_BIN_EXE_...")` is not
//! available here: the test asks cargo to build them (same profile as the test) and
//! takes their paths from cargo's JSON messages.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Builds `fusion-server` and `fusion-client` and returns their paths.
fn build_binaries() -> (PathBuf, PathBuf) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // target/<profile>/deps/two_process-<hash>: build in the same profile
    let exe = std::env::current_exe().expect("test executable path");
    let release = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .is_some_and(|p| p == "release");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "--bins",
        "-p",
        "fusion-server",
        "-p",
        "fusion-client",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    let out = cmd.stderr(Stdio::inherit()).output().expect("cargo runs");
    assert!(out.status.success(), "cargo build failed");
    let (mut server, mut client) = (None, None);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = msg["target"]["name"].as_str();
        let path = msg["executable"].as_str().map(PathBuf::from);
        match (name, path) {
            (Some("fusion-server"), Some(p)) => server = Some(p),
            (Some("fusion-client"), Some(p)) => client = Some(p),
            _ => {}
        }
    }
    (
        server.expect("cargo reported the server binary"),
        client.expect("cargo reported the client binary"),
    )
}

/// Kills the child when the test ends, whatever happens.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_and_info_in_two_processes_with_certificates_from_certs() {
    let (server_bin, client_bin) = build_binaries();
    let dir = tempfile::tempdir().unwrap();
    let d = |f: &str| dir.path().join(f);

    let certs = Command::new(&server_bin)
        .args(["certs", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(certs.status.success(), "{certs:?}");
    for f in [
        "ca.pem",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ] {
        assert!(d(f).is_file(), "{f} written");
    }

    let mut server = Reaper(
        Command::new(&server_bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--budget", "500"])
            .arg("--mnist-dir")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist"))
            .arg("--model")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/mnist-dnn.safetensors"))
            .arg("--cert")
            .arg(d("server.pem"))
            .arg("--key")
            .arg(d("server.key"))
            .arg("--client-ca")
            .arg(d("ca.pem"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = server.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("fusion-server listening on ") {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server prints its address");
    let port = addr.rsplit(':').next().unwrap();

    let info = Command::new(&client_bin)
        .args(["info", "--json", "--server"])
        .arg(format!("https://localhost:{port}"))
        .arg("--ca")
        .arg(d("ca.pem"))
        .arg("--cert")
        .arg(d("client.pem"))
        .arg("--key")
        .arg(d("client.key"))
        .output()
        .unwrap();
    assert!(
        info.status.success(),
        "info failed: {}",
        String::from_utf8_lossy(&info.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["client_subject"], "CN=client");
    assert_eq!(v["backends"], serde_json::json!(["cheetah", "echo"]));
    assert_eq!(v["budget"]["kind"], "rows");
    assert_eq!(v["budget"]["remaining"], 500);
    // the bundled model's public description came across
    assert_eq!(v["model"]["name"], "mnist-dnn");
    assert_eq!(
        v["model"]["architecture"]["output_shape"],
        serde_json::json!([10])
    );
    assert!(v["model"]["pool_size"].as_u64().unwrap() > 0);
    // the claim was measured at start-up on the 1000 pool images (true MNIST labels)
    assert_eq!(v["model"]["accuracy_samples"], 1000);
    let claimed = v["model"]["claimed_accuracy"].as_f64().unwrap();
    assert!(claimed > 0.9 && claimed < 1.0, "{claimed}");

    // a secure inference of two MNIST test images through the client binary
    let infer = Command::new(&client_bin)
        .args(["infer", "--json", "--mnist-test", "0..2", "--server"])
        .arg(format!("https://localhost:{port}"))
        .arg("--mnist-dir")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist"))
        .env("FUSION_CA", d("ca.pem"))
        .env("FUSION_CERT", d("client.pem"))
        .env("FUSION_KEY", d("client.key"))
        .env("FUSION_TRUST_STORE", d("trust"))
        .output()
        .unwrap();
    assert!(
        infer.status.success(),
        "infer failed: {}",
        String::from_utf8_lossy(&infer.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&infer.stdout).unwrap();
    // the first two test images are a 7 and a 2, and the model gets them right
    assert_eq!(v["labels"], serde_json::json!([7, 2]));
    assert_eq!(v["true_labels"], serde_json::json!([7, 2]));
    assert_eq!(v["output"], "labels");
    assert!(v.get("logits").is_none(), "labels only");
    // verified by Fusion (the default): the parameters and their exact bound
    assert_eq!(v["fusion"]["B"], 2);
    assert!(v["fusion"]["log2_escape"].as_f64().unwrap() <= -40.0);
    assert!(v["cost"]["setup"]["bytes_sent"].as_u64().unwrap() > 0);
    assert!(v["cost"]["online"]["rounds"].as_u64().unwrap() > 0);
    assert_eq!(v["cost"]["steps"][4]["step"], "layer1/linear");
    assert_eq!(v["cost"]["steps"][4]["layer"], "layer1");

    // an honest run records nothing
    assert!(!d("trust").join(fusion_client::trust::FILE_NAME).exists());

    // a server in the trust store is refused before any session: exit status 4
    let der = {
        use rustls::pki_types::pem::PemObject;
        let pem = std::fs::read(d("server.pem")).unwrap();
        rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap()
    };
    let url = format!("https://localhost:{port}");
    let mut store = fusion_client::trust::TrustStore::open(Some(&d("trust"))).unwrap();
    store
        .record(
            &fusion_client::trust::fingerprint(der.as_ref()),
            &url,
            "a test entry",
        )
        .unwrap();
    let run_infer = |extra: &[&str]| {
        Command::new(&client_bin)
            .args(["infer", "--mnist-test", "0..1", "--server", &url])
            .args(extra)
            .arg("--mnist-dir")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist"))
            .env("FUSION_CA", d("ca.pem"))
            .env("FUSION_CERT", d("client.pem"))
            .env("FUSION_KEY", d("client.key"))
            .env("FUSION_TRUST_STORE", d("trust"))
            .output()
            .unwrap()
    };
    let refused = run_infer(&[]);
    assert_eq!(refused.status.code(), Some(4), "{refused:?}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("refusing") && err.contains("a test entry"),
        "{err}"
    );
    // `trust list` shows it, `trust reset` clears it, the next run is admitted
    let list = Command::new(&client_bin)
        .args(["trust", "list"])
        .env("FUSION_TRUST_STORE", d("trust"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains(&url));
    let reset = Command::new(&client_bin)
        .args(["trust", "reset", &url])
        .env("FUSION_TRUST_STORE", d("trust"))
        .output()
        .unwrap();
    assert!(reset.status.success(), "{reset:?}");
    // a corrupt store is a named error, not an empty store
    std::fs::write(d("trust").join(fusion_client::trust::FILE_NAME), b"[").unwrap();
    let corrupt = run_infer(&[]);
    assert_eq!(corrupt.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&corrupt.stderr).contains("corrupt"));

    // a certificate that is not a client certificate (the server's own) is refused
    let refused = Command::new(&client_bin)
        .args(["info", "--server"])
        .arg(format!("https://localhost:{port}"))
        .arg("--ca")
        .arg(d("ca.pem"))
        .arg("--cert")
        .arg(d("server.pem"))
        .arg("--key")
        .arg(d("server.key"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("did not accept this client certificate"),
        "{err}"
    );
    drop(server);
}
