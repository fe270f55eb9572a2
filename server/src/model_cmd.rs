//! `fusion-server train` and `fusion-server eval`: train the MNIST model and write its
//! model file; evaluate a model file in f32 and in fixed point.

use anyhow::{Context, Result, bail};
use fusion_common::fixed::{
    DEFAULT_FRAC_BITS, FixedPoint, REQUIRED_HEADROOM_BITS, headroom_bits, ring_bits_for,
};
use fusion_common::nn::mnist::{self, Split};
use fusion_common::nn::train::{Schedule, TrainConfig, train};
use fusion_common::nn::{
    Counts, EvalReport, Evaluation, MNIST_POOL_SIZE, MNIST_POOL_START, Model, PublicPool,
    calibrate, evaluate,
};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

/// The evaluation set's name in model files.
const TEST_SET: &str = "mnist-t10k";
/// The calibration images' name in model files.
const CALIBRATION_SET: &str = "mnist-train+mnist-t10k";

/// Arguments of `fusion-server train`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Directory with the four MNIST `.gz` IDX files.
    #[arg(long, default_value = "data/mnist")]
    pub data: PathBuf,
    /// Model file to write (safetensors).
    #[arg(long, default_value = "models/mnist-dnn.safetensors")]
    pub out: PathBuf,
    /// Passes over the 60,000 training images.
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// Hidden layer widths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,128")]
    pub hidden: Vec<usize>,
    /// Seed of the training RNG (initialisation and shuffling), for a reproducible run.
    /// Default: drawn from the OS CSPRNG, so that the weights cannot be recomputed from
    /// the public code, data and defaults; the seed used is recorded in the model file
    /// (as secret as the weights) and not printed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Peak learning rate of Adam (cosine-decayed to zero).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Mini-batch size.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Augmentation: random shifts of up to this many pixels (0: none).
    #[arg(long, default_value_t = 1)]
    pub shift: usize,
    /// Decoupled (AdamW) weight decay (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Fractional bits f of the fixed-point encoding (l is then the smallest ring width
    /// with 2 bits of headroom over the largest accumulator on MNIST).
    #[arg(long, default_value_t = DEFAULT_FRAC_BITS)]
    pub frac_bits: u32,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Arguments of `fusion-server eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Model file (safetensors).
    #[arg(long, default_value = "models/mnist-dnn.safetensors")]
    pub model: PathBuf,
    /// Directory with the MNIST `.gz` IDX files.
    #[arg(long, default_value = "data/mnist")]
    pub data: PathBuf,
    /// Also print the fixed-point labels and logits of test images A..B-1.
    #[arg(long, value_name = "A..B", value_parser = parse_range)]
    pub range: Option<Range<usize>>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Instead, for each f in A..B: calibrate the ring on the training and test images,
    /// then report l, the largest accumulator, accuracy and agreement (how f was chosen).
    #[arg(long, value_name = "A..B", value_parser = parse_range)]
    pub sweep_frac_bits: Option<Range<usize>>,
}

/// Parses `A..B` with A <= B.
pub fn parse_range(s: &str) -> Result<Range<usize>, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a range A..B"))?;
    let a: usize = a
        .trim()
        .parse()
        .map_err(|e| format!("range start {a:?}: {e}"))?;
    let b: usize = b
        .trim()
        .parse()
        .map_err(|e| format!("range end {b:?}: {e}"))?;
    if a > b {
        return Err(format!("range {a}..{b} is empty backwards"));
    }
    Ok(a..b)
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

/// The training seed: the one given, or a fresh one from the OS CSPRNG (a constant
/// default would let anyone recompute the weights from the public code and data).
fn training_seed(given: Option<u64>) -> u64 {
    given.unwrap_or_else(|| rand::Rng::random(&mut rand::rng()))
}

/// `fusion-server train`: trains the MLP on MNIST, picks the ring width, evaluates, builds
/// the public pool and writes the model file.
pub fn run_train(args: &TrainArgs) -> Result<()> {
    let train_set =
        mnist::load(&args.data, Split::Train).context("loading the MNIST training set")?;
    let test_set = mnist::load(&args.data, Split::Test).context("loading the MNIST test set")?;
    let config = TrainConfig {
        hidden: args.hidden.clone(),
        epochs: args.epochs,
        batch: args.batch,
        lr: args.lr,
        schedule: Schedule::Cosine,
        seed: training_seed(args.seed),
        shift: args.shift,
        weight_decay: args.weight_decay,
        max_steps: None,
        progress: !args.quiet,
    };
    eprintln!(
        "training 784-{}-10 on {} images: {} epochs, batch {}, Adam lr {} (cosine), weight decay {}, shift {}, {}",
        args.hidden
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("-"),
        train_set.len(),
        args.epochs,
        args.batch,
        args.lr,
        args.weight_decay,
        args.shift,
        match args.seed {
            Some(s) => format!("seed {s}"),
            None => "random seed".to_owned(),
        }
    );
    let started = Instant::now();
    let trained = train(
        &config,
        &[1, mnist::SIDE, mnist::SIDE],
        mnist::CLASSES,
        train_set.to_f32().view(),
        train_set.labels(),
    )?;
    let train_secs = started.elapsed().as_secs_f64();
    eprintln!("trained in {train_secs:.1} s ({} steps)", trained.steps);

    // The ring: measure the largest accumulator over the training and test images in
    // Z_2^64, then take the smallest l with the required headroom.
    let wide = Model::new(
        trained.architecture,
        trained.params,
        FixedPoint::new(64, args.frac_bits)?,
    )?;
    let (max_abs_acc, wrapped) = calibrate(&wide, args.frac_bits, &[&train_set, &test_set])?;
    if wrapped != 0 {
        bail!("{wrapped} accumulators overflowed even in Z_2^64");
    }
    let ring_bits = ring_bits_for(max_abs_acc, REQUIRED_HEADROOM_BITS).max(2 * args.frac_bits + 2);
    let fixed = FixedPoint::new(ring_bits, args.frac_bits)?;
    eprintln!(
        "largest |accumulator| over train+test: {max_abs_acc} (2^{:.2}); ring Z_2^{ring_bits}, f = {}, headroom {} bits",
        (max_abs_acc as f64).log2(),
        args.frac_bits,
        headroom_bits(ring_bits, max_abs_acc)
    );
    let model = wide.with_fixed_point(fixed)?;

    let report = evaluate(&model, &test_set, MNIST_POOL_START + MNIST_POOL_SIZE)?;
    report.fixed.require_headroom(REQUIRED_HEADROOM_BITS)?;
    let pool = public_pool(&model, &report)?;
    let evaluation = Evaluation {
        dataset: TEST_SET.into(),
        test: report.all,
        heldout_from: report.heldout_from,
        heldout: report.heldout,
        max_abs_acc,
        calibration: CALIBRATION_SET.into(),
    };
    let model = model
        .with_training(trained.record)
        .with_evaluation(evaluation)
        .with_public_pool(pool)?;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    model.save(&args.out)?;
    // Read it back: what was written must load and verify.
    let back = Model::load(&args.out)?;
    if back.digest() != model.digest() {
        bail!("the written model file does not read back to the same model");
    }
    print_summary(&model, &report);
    println!(
        "wrote {} (training took {train_secs:.1} s)",
        args.out.display()
    );
    Ok(())
}

/// The public pool: the model's fixed-point labels on MNIST test images
/// MNIST_POOL_START..MNIST_POOL_START + MNIST_POOL_SIZE.
fn public_pool(model: &Model, report: &EvalReport) -> Result<PublicPool> {
    let range = MNIST_POOL_START..MNIST_POOL_START + MNIST_POOL_SIZE;
    let labels = report
        .fixed
        .labels
        .get(range.clone())
        .context("the test set is smaller than the public pool")?;
    let indices = range
        .map(|i| u32::try_from(i).context("pool index"))
        .collect::<Result<Vec<_>>>()?;
    let labels = labels.iter().map(|&l| l as u32).collect();
    Ok(PublicPool::new(model.digest(), indices, labels)?)
}

fn print_summary(model: &Model, report: &EvalReport) {
    let fp = model.fixed_point();
    println!("model {}", model.digest());
    println!("  architecture: {}", model.architecture());
    println!(
        "  fixed point: l = {}, f = {}",
        fp.ring_bits(),
        fp.frac_bits()
    );
    let line = |name: &str, c: &Counts| {
        println!(
            "  {name}: {} images, f32 accuracy {}, fixed-point accuracy {}, agreement {}",
            c.images,
            pct(c.f32_accuracy()),
            pct(c.fixed_accuracy()),
            pct(c.agreement())
        );
    };
    line("test set", &report.all);
    line(
        &format!("held out ({}..)", report.heldout_from),
        &report.heldout,
    );
    println!(
        "  largest |accumulator| on the test set: {} (headroom {} bits; {} wrapped); per dense layer: {}",
        report.fixed.max_abs_acc,
        report.fixed.headroom_bits(),
        report.fixed.wrapped,
        report
            .fixed
            .layer_max_abs_acc
            .iter()
            .map(|(i, m)| format!("layer {i}: {m}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let bound = pixel_range_bound(model);
    println!(
        "  worst case over all inputs in [0, 1]^{} (interval bound): |accumulator| <= {} (headroom {} bits)",
        model.architecture().input_len(),
        bound["max_abs_acc"],
        bound["headroom_bits"]
    );
    if report.fixed.headroom_bits() < i64::from(REQUIRED_HEADROOM_BITS) {
        println!(
            "  WARNING: headroom below the {REQUIRED_HEADROOM_BITS} bits the secure protocols assume"
        );
    }
    if let Some(e) = model.evaluation() {
        println!(
            "  recorded calibration ({}): largest |accumulator| {}, headroom {} bits",
            e.calibration,
            e.max_abs_acc,
            e.headroom_bits(fp.ring_bits())
        );
    }
    if let Some(p) = model.public_pool() {
        println!(
            "  public pool: {} test images, digest {}",
            p.len(),
            p.digest
        );
    }
}

/// `fusion-server eval`: loads a model file (checking it) and evaluates it on the MNIST
/// test set in f32 and in fixed point.
pub fn run_eval(args: &EvalArgs) -> Result<()> {
    let model =
        Model::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let test_set = mnist::load(&args.data, Split::Test).context("loading the MNIST test set")?;
    if let Some(r) = &args.sweep_frac_bits {
        return sweep_frac_bits(args, &model, &test_set, r.clone());
    }
    let heldout_from = model
        .evaluation()
        .map_or(MNIST_POOL_START + MNIST_POOL_SIZE, |e| e.heldout_from);
    let report = evaluate(&model, &test_set, heldout_from)?;
    if let Some(r) = &args.range
        && r.end > test_set.len()
    {
        bail!(
            "range {}..{} is outside the test set 0..{}",
            r.start,
            r.end,
            test_set.len()
        );
    }

    // Does the file's record match this evaluation?
    let mut mismatches = Vec::new();
    if let Some(e) = model.evaluation() {
        if e.test != report.all {
            mismatches.push("test-set counts");
        }
        if e.heldout != report.heldout {
            mismatches.push("held-out counts");
        }
    }
    if let Some(p) = model.public_pool() {
        let fresh = p
            .indices
            .iter()
            .map(|&i| report.fixed.labels.get(i as usize).map(|&l| l as u32))
            .collect::<Option<Vec<u32>>>();
        if fresh.as_deref() != Some(p.labels.as_slice()) {
            mismatches.push("public-pool labels");
        }
    }

    if args.json {
        let out = eval_json(args, &model, &report, &mismatches);
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_summary(&model, &report);
        if let Some(r) = &args.range {
            println!(
                "  test images {}..{} (fixed-point label, logits at scale 2^{}):",
                r.start,
                r.end,
                model.fixed_point().frac_bits()
            );
            for i in r.clone() {
                let logits = report.fixed.signed_logits(i).unwrap_or_default();
                println!(
                    "    {i:>5}: label {} (true {}) logits {:?}",
                    report.fixed.labels[i],
                    test_set.label(i).unwrap_or(0),
                    logits
                );
            }
        }
        if mismatches.is_empty() {
            println!("  the file's recorded figures and public pool match this evaluation");
        }
    }
    if !mismatches.is_empty() {
        bail!(
            "the model file's record does not match this evaluation: {}",
            mismatches.join(", ")
        );
    }
    Ok(())
}

/// The interval bound on the accumulators over every input in [0, 1] (pixels), and its
/// headroom in the model's ring.
fn pixel_range_bound(model: &Model) -> serde_json::Value {
    let fp = model.fixed_point();
    let bound = model
        .fixed_model()
        .accumulator_bound(0, 1i64 << fp.frac_bits());
    match u64::try_from(bound) {
        Ok(b) => serde_json::json!({
            "max_abs_acc": b,
            "headroom_bits": headroom_bits(fp.ring_bits(), b),
        }),
        // Beyond 2^64: no headroom at all in any supported ring.
        Err(_) => serde_json::json!({
            "max_abs_acc": bound.to_string(),
            "headroom_bits": i64::from(fp.ring_bits()) - 1 - 128 + i64::from(bound.leading_zeros()),
        }),
    }
}

/// The JSON of `fusion-server eval --json`.
fn eval_json(
    args: &EvalArgs,
    model: &Model,
    report: &EvalReport,
    mismatches: &[&str],
) -> serde_json::Value {
    let mut out = serde_json::json!({
        "model": args.model.display().to_string(),
        "model_digest": model.digest().to_hex(),
        "ring_bits": model.fixed_point().ring_bits(),
        "frac_bits": model.fixed_point().frac_bits(),
        "images": report.all.images,
        "f32_accuracy": report.all.f32_accuracy(),
        "fixed_accuracy": report.all.fixed_accuracy(),
        "agreement": report.all.agreement(),
        "heldout": {
            "from": report.heldout_from,
            "images": report.heldout.images,
            "f32_accuracy": report.heldout.f32_accuracy(),
            "fixed_accuracy": report.heldout.fixed_accuracy(),
            "agreement": report.heldout.agreement(),
        },
        "max_abs_acc": report.fixed.max_abs_acc,
        "headroom_bits": report.fixed.headroom_bits(),
        "wrapped": report.fixed.wrapped,
        "layer_max_abs_acc": report.fixed.layer_max_abs_acc,
        "calibration": model.evaluation().map(|e| serde_json::json!({
            "images": e.calibration,
            "max_abs_acc": e.max_abs_acc,
            "headroom_bits": e.headroom_bits(model.fixed_point().ring_bits()),
        })),
        "pixel_range_bound": pixel_range_bound(model),
        "claimed_accuracy": model.claimed_accuracy(),
        "public_pool": model.public_pool().map(|p| serde_json::json!({
            "size": p.len(),
            "digest": p.digest.to_hex(),
        })),
        "record_matches": mismatches.is_empty(),
    });
    if let Some(r) = &args.range {
        let labels = report.fixed.labels.get(r.clone()).unwrap_or_default();
        let logits: Vec<Vec<i64>> = r
            .clone()
            .filter_map(|i| report.fixed.signed_logits(i))
            .collect();
        out["range"] = serde_json::json!([r.start, r.end]);
        out["labels"] = serde_json::json!(labels);
        out["logits"] = serde_json::json!(logits);
    }
    out
}

/// `fusion-server eval --sweep-frac-bits A..B`.
fn sweep_frac_bits(
    args: &EvalArgs,
    model: &Model,
    test_set: &mnist::Dataset,
    range: Range<usize>,
) -> Result<()> {
    let train_set =
        mnist::load(&args.data, Split::Train).context("loading the MNIST training set")?;
    let heldout_from = MNIST_POOL_START + MNIST_POOL_SIZE;
    let mut rows = Vec::new();
    for f in range {
        let f = u32::try_from(f).context("fractional bits")?;
        let (max_abs_acc, wrapped) = calibrate(model, f, &[&train_set, test_set])?;
        let l = ring_bits_for(max_abs_acc, REQUIRED_HEADROOM_BITS).max(2 * f + 2);
        let m = model.with_fixed_point(FixedPoint::new(l, f)?)?;
        let r = evaluate(&m, test_set, heldout_from)?;
        rows.push(serde_json::json!({
            "frac_bits": f,
            "ring_bits": l,
            "max_abs_acc": max_abs_acc,
            "wrapped_in_z2_64": wrapped,
            "f32_accuracy": r.all.f32_accuracy(),
            "fixed_accuracy": r.all.fixed_accuracy(),
            "agreement": r.all.agreement(),
            "heldout_fixed_accuracy": r.heldout.fixed_accuracy(),
        }));
        if !args.json {
            println!(
                "f = {f:>2}: l = {l:>2}, largest |acc| {max_abs_acc:>14}, f32 {}, fixed {}, agreement {} (held out: fixed {})",
                pct(r.all.f32_accuracy()),
                pct(r.all.fixed_accuracy()),
                pct(r.all.agreement()),
                pct(r.heldout.fixed_accuracy())
            );
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Cmd {
        Train(TrainArgs),
        Eval(EvalArgs),
    }

    fn repo(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(rel)
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("0..10"), Ok(0..10));
        assert_eq!(parse_range("5..5"), Ok(5..5));
        assert!(parse_range("7..3").is_err());
        assert!(parse_range("7").is_err());
        assert!(parse_range("a..3").is_err());
        assert!(parse_range("-1..3").is_err());
    }

    #[test]
    fn arguments_and_defaults() {
        let cli =
            Cli::try_parse_from(["x", "train", "--hidden", "64,32", "--epochs", "3"]).unwrap();
        let Cmd::Train(t) = cli.command else {
            panic!("train")
        };
        assert_eq!(t.hidden, vec![64, 32]);
        assert_eq!(t.epochs, 3);
        // no seed given: a fresh one from the OS CSPRNG at training time
        assert_eq!((t.seed, t.batch, t.shift, t.frac_bits), (None, 128, 1, 12));
        assert_ne!(training_seed(None), training_seed(None));
        assert_eq!(training_seed(Some(7)), 7);
        assert_eq!(t.out, PathBuf::from("models/mnist-dnn.safetensors"));
        let cli = Cli::try_parse_from(["x", "eval", "--model", "m", "--range", "3..7", "--json"])
            .unwrap();
        let Cmd::Eval(e) = cli.command else {
            panic!("eval")
        };
        assert_eq!(e.range, Some(3..7));
        assert!(e.json);
        assert!(Cli::try_parse_from(["x", "eval", "--range", "9..1"]).is_err());
    }

    /// `train` end to end at a tiny size (one epoch, 8 hidden units), then `eval`'s JSON.
    #[test]
    fn train_then_eval() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tiny.safetensors");
        let args = TrainArgs {
            data: repo("data/mnist"),
            out: out.clone(),
            epochs: 1,
            hidden: vec![8],
            seed: Some(3),
            lr: 3e-3,
            batch: 128,
            shift: 0,
            weight_decay: 0.0,
            frac_bits: 12,
            quiet: true,
        };
        run_train(&args).unwrap();
        let model = Model::load(&out).unwrap();
        let e = model.evaluation().unwrap();
        assert!(e.test.f32_accuracy() > 0.8, "{e:?}");
        assert_eq!(
            model.fixed_point().ring_bits(),
            ring_bits_for(e.max_abs_acc, REQUIRED_HEADROOM_BITS).max(26)
        );
        assert_eq!(model.public_pool().unwrap().len(), MNIST_POOL_SIZE);
        // the seed given is the one recorded in the (owner-only) model file
        assert_eq!(model.training().unwrap().seed, 3);

        let eval_args = EvalArgs {
            model: out,
            data: repo("data/mnist"),
            range: Some(2..5),
            json: true,
            sweep_frac_bits: None,
        };
        run_eval(&eval_args).unwrap();
        let test_set = mnist::load(repo("data/mnist"), Split::Test).unwrap();
        let report = evaluate(&model, &test_set, e.heldout_from).unwrap();
        let json = eval_json(&eval_args, &model, &report, &[]);
        assert_eq!(json["f32_accuracy"], e.test.f32_accuracy());
        assert_eq!(json["fixed_accuracy"], e.test.fixed_accuracy());
        assert_eq!(json["agreement"], e.test.agreement());
        assert_eq!(json["labels"].as_array().unwrap().len(), 3);
        let logits = json["logits"].as_array().unwrap();
        assert_eq!(logits.len(), 3);
        assert_eq!(logits[0].as_array().unwrap().len(), 10);
        assert_eq!(
            logits[1],
            serde_json::json!(report.fixed.signed_logits(3).unwrap())
        );
        assert_eq!(json["labels"][2], report.fixed.labels[4]);
        assert_eq!(json["record_matches"], true);
        assert_eq!(json["ring_bits"], model.fixed_point().ring_bits());
    }
}
