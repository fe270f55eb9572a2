//! `fusion-client info`: what the server serves, under which policy, and this client's
//! budget.

use std::fmt::Write as _;

use clap::Args;
use fusion_common::net::ServiceInfo;

use crate::args::ConnectArgs;

/// Flags of `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Connects, asks, prints.
pub async fn run(args: InfoArgs) -> anyhow::Result<()> {
    let client = args.connect.connect().await?;
    let info = client.model_info().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", render_info(&info));
    }
    Ok(())
}

fn shape(s: &[u64]) -> String {
    let dims: Vec<String> = s.iter().map(u64::to_string).collect();
    format!("[{}]", dims.join("x"))
}

/// The service description as text.
pub fn render_info(info: &ServiceInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "server        fusion-server {}", info.server_version);
    let _ = writeln!(s, "you are       {}", info.client_subject);
    match &info.model {
        None => {
            let _ = writeln!(s, "model         none loaded (diagnostic backends only)");
        }
        Some(m) => {
            let _ = writeln!(s, "model         {}", m.name);
            let a = &m.architecture;
            let _ = writeln!(s, "  input       {}", shape(&a.input_shape));
            for (i, l) in a.layers.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "  layer {i:<4}  {:<8} {} -> {}",
                    l.kind,
                    shape(&l.input_shape),
                    shape(&l.output_shape)
                );
            }
            let _ = writeln!(s, "  output      {}", shape(&a.output_shape));
            let _ = writeln!(
                s,
                "  fixed point l = {} (ring Z_2^{}), f = {} (scale 2^{})",
                m.ring_bits, m.ring_bits, m.scale_bits, m.scale_bits
            );
            if m.accuracy_samples > 0 {
                let _ = writeln!(
                    s,
                    "  claimed     accuracy {:.2}% on {} test images",
                    100.0 * m.claimed_accuracy,
                    m.accuracy_samples
                );
            } else {
                let _ = writeln!(s, "  claimed     no accuracy claim");
            }
            let _ = writeln!(s, "  digest      {}", hex::encode(&m.model_digest));
            let _ = writeln!(
                s,
                "  public pool {} entries of {}, digest {}",
                m.pool_size,
                m.pool_dataset,
                hex::encode(&m.pool_digest)
            );
        }
    }
    let _ = writeln!(s, "backends      {}", info.backends.join(", "));
    let _ = writeln!(s, "output        {}", info.output);
    let _ = writeln!(s, "max rows      {} per batch", info.max_rows);
    let _ = writeln!(s, "your budget   {}", info.budget);
    let _ = writeln!(
        s,
        "limits        {} per frame, {} per message",
        fusion_common::cost::human_bytes(info.max_frame_bytes),
        fusion_common::cost::human_bytes(info.max_message_bytes)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusion_common::net::{Architecture, Budget, LayerInfo, ModelSummary, OutputMode};

    #[test]
    fn the_text_form_shows_layers_fixed_point_claim_and_budget() {
        let info = ServiceInfo {
            server_version: "0.1.0".into(),
            model: Some(ModelSummary {
                name: "mnist-dnn".into(),
                architecture: Architecture {
                    input_shape: vec![784],
                    layers: vec![LayerInfo {
                        kind: "dense".into(),
                        input_shape: vec![784],
                        output_shape: vec![10],
                    }],
                    output_shape: vec![10],
                },
                ring_bits: 37,
                scale_bits: 12,
                claimed_accuracy: 0.9812,
                accuracy_samples: 9000,
                model_digest: vec![0xab; 32],
                pool_dataset: "mnist-t10k".into(),
                pool_size: 1000,
                pool_digest: vec![0xcd; 32],
            }),
            backends: vec!["echo".into()],
            output: OutputMode::Labels,
            max_rows: 64,
            budget: Budget::Rows {
                limit: 100,
                remaining: 60,
            },
            max_frame_bytes: 1 << 20,
            max_message_bytes: 1 << 30,
            client_subject: "CN=alice".into(),
        };
        let t = render_info(&info);
        assert!(t.contains("you are       CN=alice"), "{t}");
        assert!(t.contains("layer 0     dense    [784] -> [10]"), "{t}");
        assert!(t.contains("l = 37") && t.contains("f = 12"), "{t}");
        assert!(t.contains("accuracy 98.12% on 9000 test images"), "{t}");
        assert!(t.contains("1000 entries of mnist-t10k"), "{t}");
        assert!(t.contains("your budget   60 of 100 rows"), "{t}");
    }
}
