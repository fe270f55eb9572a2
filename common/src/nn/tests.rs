//! Tests of models and model files, training on MNIST, and the bundled models.

use super::mnist::{self, Split};
use super::train::{Schedule, TrainConfig, train};
use super::*;
use crate::fixed::{FixedError, FixedPoint, REQUIRED_HEADROOM_BITS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::PathBuf;

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

/// A 6-5-4-3 MLP over a [2, 3] input with seeded random weights.
fn small_model(seed: u64) -> Model {
    let mut rng = ChaCha12Rng::seed_from_u64(seed);
    let arch = Architecture::mlp(&[2, 3], &[5, 4], 3).unwrap();
    let params = arch
        .layers()
        .iter()
        .map(|l| {
            l.params()
                .into_iter()
                .map(|p| {
                    let n = p.shape.iter().product();
                    let data = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                    Tensor::new(p.shape, data).unwrap()
                })
                .collect()
        })
        .collect();
    Model::new(arch, params, FixedPoint::new(37, 12).unwrap()).unwrap()
}

fn full_model(seed: u64) -> Model {
    let m = small_model(seed);
    let pool = PublicPool::new(m.digest(), vec![0, 1, 2], vec![2, 0, 1]).unwrap();
    let evaluation = Evaluation {
        dataset: "test".into(),
        test: Counts {
            images: 10,
            f32_correct: 9,
            fixed_correct: 9,
            agree: 10,
        },
        heldout_from: 3,
        heldout: Counts {
            images: 7,
            f32_correct: 6,
            fixed_correct: 6,
            agree: 7,
        },
        max_abs_acc: 12345,
        calibration: "test".into(),
    };
    m.with_evaluation(evaluation)
        .with_public_pool(pool)
        .unwrap()
}

#[cfg(unix)]
#[test]
fn model_file_is_written_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let m = full_model(1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    m.save(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
    // an existing world-readable file is narrowed when overwritten
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    m.save(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
    assert_eq!(Model::load(&path).unwrap().digest(), m.digest());
}

#[test]
fn model_file_round_trip() {
    let m = full_model(1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    m.save(&path).unwrap();
    let back = Model::load(&path).unwrap();
    assert_eq!(back.digest(), m.digest());
    assert_eq!(back.architecture(), m.architecture());
    assert_eq!(back.fixed_point(), m.fixed_point());
    assert_eq!(back.evaluation(), m.evaluation());
    assert_eq!(back.public_pool(), m.public_pool());
    assert_eq!(back.claimed_accuracy(), Some(6.0 / 7.0));
    for i in 0..m.architecture().layers().len() {
        assert_eq!(back.layer_params(i), m.layer_params(i));
    }
    assert_eq!(back.fixed_model().layers().len(), 6);
    // The same model gives the same bytes (sorted header), and bytes round-trip.
    let bytes = m.to_bytes().unwrap();
    assert_eq!(bytes, back.to_bytes().unwrap());
    assert_eq!(bytes, std::fs::read(&path).unwrap());
    // Another model has another digest.
    assert_ne!(small_model(2).digest(), m.digest());
    // So does the same weights at another scale.
    let other = m
        .with_fixed_point(FixedPoint::new(40, 13).unwrap())
        .unwrap();
    assert_ne!(other.digest(), m.digest());
    assert!(other.public_pool().is_none());
}

#[test]
fn the_file_is_plain_safetensors_with_pytorch_names() {
    let m = full_model(1);
    let bytes = m.to_bytes().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "1.bias", "1.weight", "3.bias", "3.weight", "5.bias", "5.weight"
        ]
    );
    let w = st.tensor("1.weight").unwrap();
    assert_eq!(w.dtype(), Dtype::F32);
    assert_eq!(w.shape(), [5, 6]);
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["format"], FORMAT);
    assert_eq!(meta["ring_bits"], "37");
    assert_eq!(meta["frac_bits"], "12");
    assert_eq!(meta["model_digest"], m.digest().to_hex());
}

fn tensor_offset(bytes: &[u8], name: &str) -> usize {
    let (n, meta) = SafeTensors::read_metadata(bytes).unwrap();
    8 + n + meta.info(name).unwrap().data_offsets.0
}

#[test]
fn flipped_weight_byte_is_a_digest_mismatch() {
    let m = full_model(1);
    let mut bytes = m.to_bytes().unwrap();
    // The low mantissa byte of the third element of 3.weight: a tiny, finite change.
    let at = tensor_offset(&bytes, "3.weight") + 2 * 4;
    bytes[at] ^= 0x01;
    let err = Model::from_bytes(&bytes).unwrap_err();
    assert!(matches!(err, ModelError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&m.digest().to_hex()));
    // The same for a bias byte.
    let mut bytes = m.to_bytes().unwrap();
    let at = tensor_offset(&bytes, "5.bias");
    bytes[at] ^= 0x80;
    assert!(matches!(
        Model::from_bytes(&bytes),
        Err(ModelError::DigestMismatch { .. })
    ));
}

#[test]
fn truncated_or_extended_file_is_refused() {
    let bytes = full_model(1).to_bytes().unwrap();
    let len = bytes.len() as u64;
    match Model::from_bytes(&bytes[..bytes.len() - 1]) {
        Err(ModelError::Truncated { expected, actual }) => {
            assert_eq!((expected, actual), (len, len - 1));
        }
        other => panic!("{other:?}"),
    }
    let (n, _) = SafeTensors::read_metadata(&bytes).unwrap();
    assert!(matches!(
        Model::from_bytes(&bytes[..8 + n - 5]),
        Err(ModelError::Truncated { .. })
    ));
    assert!(matches!(
        Model::from_bytes(&bytes[..5]),
        Err(ModelError::Truncated {
            expected: 8,
            actual: 5
        })
    ));
    assert!(matches!(
        Model::from_bytes(&[]),
        Err(ModelError::Truncated { .. })
    ));
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        Model::from_bytes(&longer),
        Err(ModelError::TrailingData { .. })
    ));
    // A file on disk that is truncated gives the same.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        Model::load(&path),
        Err(ModelError::Truncated { .. })
    ));
    assert!(matches!(
        Model::load(dir.path().join("absent.safetensors")),
        Err(ModelError::Io { .. })
    ));
}

/// Rewrites a model file with the given tensors (name, dtype, shape, little-endian bytes)
/// and metadata edits, through the safetensors crate.
fn rewrite(
    bytes: &[u8],
    edit_tensors: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
    edit_meta: impl FnOnce(&mut HashMap<String, String>),
) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit_tensors(&mut tensors);
    edit_meta(&mut meta);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

#[test]
fn unchanged_rewrite_still_loads() {
    let bytes = full_model(1).to_bytes().unwrap();
    let same = rewrite(&bytes, |_| {}, |_| {});
    assert_eq!(
        Model::from_bytes(&same).unwrap().digest(),
        full_model(1).digest()
    );
}

#[test]
fn tensor_of_wrong_shape_is_refused_naming_it_and_both_shapes() {
    let bytes = full_model(1).to_bytes().unwrap();
    let bad = rewrite(
        &bytes,
        |ts| {
            let t = ts.iter_mut().find(|t| t.0 == "3.weight").unwrap();
            t.2 = vec![5, 4]; // declared [4, 5]; same number of bytes
        },
        |_| {},
    );
    let err = Model::from_bytes(&bad).unwrap_err();
    match &err {
        ModelError::ShapeMismatch {
            name,
            expected,
            actual,
        } => {
            assert_eq!(name, "3.weight");
            assert_eq!(expected, &[4, 5]);
            assert_eq!(actual, &[5, 4]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "model tensor \"3.weight\" has shape [5, 4], the architecture needs [4, 5]"
    );
    // A tensor with fewer elements.
    let bad = rewrite(
        &bytes,
        |ts| {
            let t = ts.iter_mut().find(|t| t.0 == "1.bias").unwrap();
            t.2 = vec![4];
            t.3.truncate(16);
        },
        |_| {},
    );
    assert!(matches!(
        Model::from_bytes(&bad),
        Err(ModelError::ShapeMismatch { ref name, .. }) if name == "1.bias"
    ));
}

#[test]
fn missing_extra_or_mistyped_tensor_is_refused() {
    let bytes = full_model(1).to_bytes().unwrap();
    let bad = rewrite(&bytes, |ts| ts.retain(|t| t.0 != "5.bias"), |_| {});
    match Model::from_bytes(&bad) {
        Err(ModelError::MissingTensor { name }) => assert_eq!(name, "5.bias"),
        other => panic!("{other:?}"),
    }
    let bad = rewrite(
        &bytes,
        |ts| ts.push(("7.weight".into(), Dtype::F32, vec![1], vec![0; 4])),
        |_| {},
    );
    match Model::from_bytes(&bad) {
        Err(ModelError::UnexpectedTensor { name }) => assert_eq!(name, "7.weight"),
        other => panic!("{other:?}"),
    }
    let bad = rewrite(
        &bytes,
        |ts| {
            let t = ts.iter_mut().find(|t| t.0 == "1.bias").unwrap();
            t.1 = Dtype::I32;
        },
        |_| {},
    );
    assert!(matches!(
        Model::from_bytes(&bad),
        Err(ModelError::DtypeMismatch { ref name, .. }) if name == "1.bias"
    ));
}

#[test]
fn bad_metadata_is_refused_with_its_key() {
    let bytes = full_model(1).to_bytes().unwrap();
    let with = |f: &dyn Fn(&mut HashMap<String, String>)| {
        Model::from_bytes(&rewrite(&bytes, |_| {}, |m| f(m))).unwrap_err()
    };
    assert!(matches!(
        with(&|m| {
            m.remove("format");
        }),
        ModelError::NotFusionModel { found: None, .. }
    ));
    assert!(matches!(
        with(&|m| {
            m.insert("format".into(), "fusion-model/2".into());
        }),
        ModelError::NotFusionModel { .. }
    ));
    assert!(matches!(
        with(&|m| {
            m.remove("architecture");
        }),
        ModelError::MissingMetadata {
            key: "architecture"
        }
    ));
    assert!(matches!(
        with(&|m| {
            m.insert("ring_bits".into(), "thirty".into());
        }),
        ModelError::BadMetadata {
            key: "ring_bits",
            ..
        }
    ));
    assert!(matches!(
        with(&|m| {
            m.insert("ring_bits".into(), "20".into()); // 2f + 2 > l
        }),
        ModelError::BadMetadata {
            key: "ring_bits",
            ..
        }
    ));
    // Other (valid) fixed-point parameters change the digest: refused as such.
    assert!(matches!(
        with(&|m| {
            m.insert("ring_bits".into(), "38".into());
        }),
        ModelError::DigestMismatch { .. }
    ));
    // An architecture that does not match the tensors.
    assert!(matches!(
        with(&|m| {
            let a = m["architecture"]
                .replace("\"outputs\":4", "\"outputs\":6")
                .replace("\"inputs\":4", "\"inputs\":6");
            m.insert("architecture".into(), a);
        }),
        ModelError::ShapeMismatch { .. }
    ));
    assert!(matches!(
        with(&|m| {
            m.insert(
                "architecture".into(),
                "{\"input\":[6],\"layers\":[]}".into(),
            );
        }),
        ModelError::BadMetadata {
            key: "architecture",
            ..
        }
    ));
    assert!(matches!(
        with(&|m| {
            m.insert("model_digest".into(), "00".repeat(32));
        }),
        ModelError::DigestMismatch { .. }
    ));
    assert!(matches!(
        with(&|m| {
            m.insert("model_digest".into(), "xyz".into());
        }),
        ModelError::BadMetadata {
            key: "model_digest",
            ..
        }
    ));
    // A public pool whose labels were changed no longer verifies.
    assert!(matches!(
        with(&|m| {
            let p = m["public_pool"].replace("\"labels\":[2,", "\"labels\":[3,");
            m.insert("public_pool".into(), p);
        }),
        ModelError::Pool(PoolError::DigestMismatch { .. })
    ));
    assert!(matches!(
        with(&|m| {
            m.insert("evaluation".into(), "{}".into());
        }),
        ModelError::BadMetadata {
            key: "evaluation",
            ..
        }
    ));
}

#[test]
fn model_construction_refusals() {
    let arch = Architecture::mlp(&[2], &[], 2).unwrap();
    let fp = FixedPoint::new(37, 12).unwrap();
    let t = |shape: Vec<usize>, v: f32| {
        let n = shape.iter().product();
        Tensor::new(shape, vec![v; n]).unwrap()
    };
    assert!(matches!(
        Model::new(arch.clone(), vec![vec![t(vec![2, 2], 0.5), t(vec![3], 0.5)]], fp),
        Err(ModelError::ShapeMismatch { ref name, .. }) if name == "0.bias"
    ));
    assert!(matches!(
        Model::new(arch.clone(), vec![vec![t(vec![2, 2], 0.5)]], fp),
        Err(ModelError::ParamCount {
            layer: 0,
            expected: 2,
            actual: 1,
            ..
        })
    ));
    assert!(matches!(
        Model::new(arch.clone(), vec![vec![t(vec![2, 2], f32::NAN), t(vec![2], 0.5)]], fp),
        Err(ModelError::NonFinite { ref name, index: 0 }) if name == "0.weight"
    ));
    // 2^30 at scale 2^12 needs 43 bits: out of Z_2^37.
    assert!(matches!(
        Model::new(arch.clone(), vec![vec![t(vec![2, 2], 1.0e9), t(vec![2], 0.5)]], fp),
        Err(ModelError::Fixed(FixedError::Param { ref tensor, .. })) if tensor == "0.weight"
    ));
    // A bias of 2^13 at scale 2^24 needs 38 bits.
    assert!(matches!(
        Model::new(arch.clone(), vec![vec![t(vec![2, 2], 0.5), t(vec![2], 8192.0)]], fp),
        Err(ModelError::Fixed(FixedError::Param { ref tensor, .. })) if tensor == "0.bias"
    ));
    assert!(matches!(
        Tensor::new(vec![2, 2], vec![0.0; 3]),
        Err(ModelError::TensorData { .. })
    ));
    let m = Model::new(arch, vec![vec![t(vec![2, 2], 0.5), t(vec![2], 0.5)]], fp).unwrap();
    assert!(matches!(
        m.clone()
            .with_public_pool(PublicPool::new(&ModelDigest([0; 32]), vec![0], vec![1]).unwrap()),
        Err(ModelError::Pool(PoolError::DigestMismatch { .. }))
    ));
    let x = ndarray::Array2::<f32>::zeros((1, 3));
    assert!(matches!(
        m.forward_f32(x.view()),
        Err(ModelError::InputLength { row_len: 2, .. })
    ));
}

#[test]
fn debug_output_redacts_weights() {
    let arch = Architecture::mlp(&[2], &[], 2).unwrap();
    let w = Tensor::new(vec![2, 2], vec![0.123_456_7; 4]).unwrap();
    let b = Tensor::new(vec![2], vec![0.765_432_1; 2]).unwrap();
    let m = Model::new(arch, vec![vec![w, b]], FixedPoint::new(37, 12).unwrap()).unwrap();
    let fixed_w = m
        .fixed_model()
        .fixed_point()
        .encode(0.123_456_7)
        .unwrap()
        .to_string();
    for s in [format!("{m:?}"), format!("{:?}", m.fixed_model())] {
        assert!(s.contains("redacted"), "{s}");
        assert!(!s.contains("0.123"), "{s}");
        assert!(!s.contains("0.765"), "{s}");
        assert!(!s.contains(&fixed_w), "{s}");
    }
}

#[test]
fn mnist_files_match_their_md5sums() {
    use md5::{Digest, Md5};
    let dir = repo_path("data/mnist");
    let sums = std::fs::read_to_string(dir.join("MD5SUMS.raw")).unwrap();
    let mut checked = 0;
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (sum, name) = line.split_once(char::is_whitespace).unwrap();
        let raw = mnist::decompress(&dir.join(format!("{}.gz", name.trim()))).unwrap();
        assert_eq!(hex::encode(Md5::digest(&raw)), sum, "{name}");
        checked += 1;
    }
    assert_eq!(checked, 4);
    let test = mnist::load(&dir, Split::Test).unwrap();
    assert_eq!(test.len(), 10_000);
    assert_eq!(test.image(0).map(<[u8]>::len), Some(784));
    assert_eq!(&test.labels()[..10], &[7, 2, 1, 0, 4, 1, 4, 9, 5, 9]);
    assert!(test.image(10_000).is_none());
    assert!(matches!(
        test.slice(9_000..10_001),
        Err(mnist::MnistError::Range { .. })
    ));
    // The loader refuses the labels file in place of the images file.
    let err = mnist::read_images(&Split::Test.labels_path(&dir)).unwrap_err();
    assert!(matches!(err, mnist::MnistError::BadMagic { .. }), "{err}");
}

#[test]
fn training_on_a_small_subset_reaches_85_percent_within_400_steps() {
    let dir = repo_path("data/mnist");
    // The first 2,000 test images train; the next 1,000 evaluate (the loader of the
    // 60,000 training images is exercised by the md5 test).
    let all = mnist::load(&dir, Split::Test).unwrap();
    let train_set = all.slice(0..2_000).unwrap();
    let eval_set = all.slice(2_000..3_000).unwrap();
    let config = TrainConfig {
        hidden: vec![64],
        epochs: 10,
        batch: 50,
        lr: 2e-3,
        schedule: Schedule::Cosine,
        seed: 7,
        shift: 0,
        weight_decay: 0.0,
        max_steps: Some(400),
        progress: false,
    };
    let trained = train(
        &config,
        &[1, 28, 28],
        10,
        train_set.to_f32().view(),
        train_set.labels(),
    )
    .unwrap();
    assert_eq!(trained.steps, 400); // 10 epochs of 40 mini-batches
    let model = Model::new(
        trained.architecture,
        trained.params,
        FixedPoint::new(33, 12).unwrap(),
    )
    .unwrap();
    let report = evaluate(&model, &eval_set, 0).unwrap();
    assert!(
        report.all.f32_accuracy() >= 0.85,
        "f32 accuracy {}",
        report.all.f32_accuracy()
    );
    assert!(report.all.fixed_accuracy() >= 0.85);
    assert!(report.all.agreement() >= 0.99);
    assert_eq!(report.fixed.wrapped, 0);
}

/// The bundled model files load (their digest verifies), and their recorded figures and
/// public pool are those of a fresh evaluation on the 10,000 test images.
#[test]
fn bundled_models_match_a_fresh_evaluation() {
    let test = mnist::load(repo_path("data/mnist"), Split::Test).unwrap();
    for (file, hidden, min_accuracy) in [
        ("models/mnist-dnn.safetensors", vec![128, 128], 0.98),
        ("models/mnist-784-32-10.safetensors", vec![32], 0.95),
    ] {
        let model = Model::load(repo_path(file)).unwrap();
        assert_eq!(
            model.architecture(),
            &Architecture::mlp(&[1, 28, 28], &hidden, 10).unwrap()
        );
        let e = model.evaluation().unwrap().clone();
        let fp = model.fixed_point();
        assert_eq!(fp.frac_bits(), 12);
        // l is the smallest ring with the required headroom over the calibration.
        assert_eq!(
            fp.ring_bits(),
            crate::fixed::ring_bits_for(e.max_abs_acc, REQUIRED_HEADROOM_BITS)
        );
        assert_eq!(e.heldout_from, MNIST_POOL_SIZE);
        let report = evaluate(&model, &test, e.heldout_from).unwrap();
        assert_eq!(report.all, e.test, "{file}");
        assert_eq!(report.heldout, e.heldout, "{file}");
        assert!(e.test.f32_accuracy() >= min_accuracy, "{file}");
        assert!(e.test.agreement() >= 0.995, "{file}");
        assert!(
            e.test.f32_accuracy() - e.test.fixed_accuracy() <= 0.002,
            "{file}"
        );
        // The test images are part of the calibration set.
        assert!(report.fixed.max_abs_acc <= e.max_abs_acc);
        assert_eq!(report.fixed.wrapped, 0);
        report
            .fixed
            .require_headroom(REQUIRED_HEADROOM_BITS)
            .unwrap();
        // The public pool: the model's fixed-point labels on test images 0..1000.
        let pool = model.public_pool().unwrap();
        pool.verify(model.digest()).unwrap();
        assert_eq!(
            pool.indices,
            (0..MNIST_POOL_SIZE as u32).collect::<Vec<_>>()
        );
        let labels: Vec<u32> = report.fixed.labels[..MNIST_POOL_SIZE]
            .iter()
            .map(|&l| l as u32)
            .collect();
        assert_eq!(pool.labels, labels);
        // The digest in the file is the digest of what was read.
        assert_eq!(
            model.digest(),
            Model::from_bytes(&model.to_bytes().unwrap())
                .unwrap()
                .digest()
        );
    }
}
