//! The real binaries in two processes on loopback: `fusion-server certs` makes the
//! certificates, `fusion-server serve` (with the bundled model) listens on port 0 and
//! prints its address, `fusion-client info --json` asks it over mutual TLS and
//! `fusion-client infer --json` runs a secure inference (flags from the environment).
//!
//! The binaries' `main`s are one call each into `fusion_server::cli::main` and
//! `fusion_client::cli::main`; this package carries the same two one-line `main`s as
//! its own binaries (`fusion-server-e2e`, `fusion-client-e2e`), so cargo builds them in
//! the test build itself (a `cargo build` of the other packages from inside the test
//! would build the whole workspace a second time, with other features).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fusion_tests::process::{Reaper, listening_port, serve_command};

/// The paths of the two binaries, built by cargo with this test.
fn build_binaries() -> (PathBuf, PathBuf) {
    (
        PathBuf::from(env!("CARGO_BIN_EXE_fusion-server-e2e")),
        PathBuf::from(env!("CARGO_BIN_EXE_fusion-client-e2e")),
    )
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
        serve_command(&server_bin, dir.path())
            .args(["--budget", "500"])
            .arg("--mnist-dir")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist"))
            .arg("--model")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/mnist-dnn.safetensors"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let port = listening_port(&mut server);
    let port = port.as_str();

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
        // check (c) at 1 - 1e-9: at the default 0.999 an honest batch is flagged with
        // probability up to 1e-3 by design
        .args(["infer", "--json", "--confidence", "0.999999999"])
        .args(["--mnist-test", "0..2", "--server"])
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
    // the default preprocesses the linear layers (offline HE, then the masked input)
    assert_eq!(v["cost"]["steps"][4]["step"], "offline/linear");
    assert_eq!(v["cost"]["steps"][4]["layer"], "offline");
    let steps = v["cost"]["steps"].as_array().unwrap();
    assert!(steps.iter().any(|s| s["step"] == "layer1/linear"));
    assert!(v["cost"]["offline"]["bytes_sent"].as_u64().unwrap() > 100_000);

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
