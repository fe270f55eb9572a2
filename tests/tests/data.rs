//! The bundled MNIST files: each decompresses to the original IDX bytes (MD5 sums from
//! `data/mnist/MD5SUMS.raw`), and the model module's IDX loader reads them.

use std::io::Read;
use std::path::PathBuf;

use fusion_common::nn::mnist;
use md5::{Digest, Md5};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("data")
        .join("mnist")
}

#[test]
fn decompressed_files_match_the_published_md5_sums() {
    let dir = data_dir();
    let sums = std::fs::read_to_string(dir.join("MD5SUMS.raw")).unwrap();
    let mut checked = 0;
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (want, name) = line.split_once("  ").expect("`<md5>  <file>` lines");
        let gz = std::fs::File::open(dir.join(format!("{name}.gz"))).unwrap();
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .unwrap();
        let got = hex::encode(Md5::digest(&raw));
        assert_eq!(got, want, "{name}");
        checked += 1;
    }
    assert_eq!(checked, 4);
}

#[test]
fn the_idx_loader_reads_the_test_set() {
    let test = mnist::load(data_dir(), mnist::Split::Test).unwrap();
    assert_eq!(test.len(), 10_000);
    assert_eq!(test.images().len(), 10_000 * mnist::PIXELS);
    assert!(
        test.labels()
            .iter()
            .all(|&l| usize::from(l) < mnist::CLASSES)
    );
}
