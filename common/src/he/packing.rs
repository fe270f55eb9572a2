//! Cheetah's coefficient packing for a batched matrix product, and the byte formulas.
//!
//! A block of B' rows by n_i' inputs of X goes in one ciphertext, an n_o' x n_i' block of
//! W in one plaintext polynomial, with B' n_i' n_o' <= N (Cheetah §4.1, HomFC, extended
//! over the batch as in §4.2's treatment of the channel dimension):
//!
//! ```text
//! x(X) = sum_{b<B', j<n_i'} X[b][j]         * X^(b n_i' n_o' + j)
//! w(X) = sum_{r<n_o', j<n_i'} W[r][j]        * X^(r n_i' + n_i' - 1 - j)
//! (x w)[b n_i' n_o' + r n_i' + n_i' - 1]   = sum_j W[r][j] X[b][j]
//! ```
//!
//! Every other product term lands on an exponent that is not = n_i' - 1 (mod n_i'), or
//! wraps (negacyclically) below n_i' - 1, so the kept coefficients carry exactly the inner
//! products. A layer needs ceil(B/B') ceil(n_i/n_i') input ciphertexts and
//! ceil(B/B') ceil(n_o/n_o') output ciphertexts, each output the sum over the input blocks.

use super::HeError;
use super::params::{DEGREE, HeParams, LOG_MAX_OUTPUTS, LOG_MAX_WEIGHT_TERMS};
use super::wire::{QUERY_HEADER_LEN, RESPONSE_HEADER_LEN};

/// Largest number of rows, inputs or outputs of one layer call.
pub const MAX_DIM: usize = 1 << 16;

/// The shape of one batched linear layer Y = W X + b: `rows` (the batch B) by `inputs`
/// (n_i) in, `rows` by `outputs` (n_o) out; W is `outputs` x `inputs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinearShape {
    /// B, the rows of the batch
    pub rows: usize,
    /// n_i
    pub inputs: usize,
    /// n_o
    pub outputs: usize,
}

impl LinearShape {
    /// A shape; use [`LinearShape::check`] before a protocol call (the calls do).
    pub const fn new(rows: usize, inputs: usize, outputs: usize) -> Self {
        Self {
            rows,
            inputs,
            outputs,
        }
    }

    /// Refuses shapes outside what the parameters are sized for.
    pub fn check(&self) -> Result<(), HeError> {
        let bad = |reason| {
            Err(HeError::UnsupportedShape {
                shape: *self,
                reason,
            })
        };
        if self.rows == 0 || self.inputs == 0 || self.outputs == 0 {
            return bad("empty dimension");
        }
        if self.rows > MAX_DIM || self.inputs > MAX_DIM || self.outputs > MAX_DIM {
            return bad("dimension above 2^16");
        }
        if self.rows * self.outputs > 1 << LOG_MAX_OUTPUTS {
            return bad("more than 2^18 outputs in one call (flooding budget)");
        }
        Ok(())
    }
}

/// Block sizes of the packing: B' rows, n_i' inputs and n_o' outputs per polynomial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Packing {
    /// B'
    pub rows: usize,
    /// n_i'
    pub inputs: usize,
    /// n_o'
    pub outputs: usize,
}

/// Bytes and ciphertexts of one layer call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerCost {
    /// the packing used
    pub packing: Packing,
    /// ciphertexts client -> server
    pub input_cts: usize,
    /// ciphertexts server -> client
    pub output_cts: usize,
    /// payload bytes client -> server (header and ciphertexts)
    pub query_bytes: usize,
    /// payload bytes server -> client (header and ciphertexts)
    pub response_bytes: usize,
}

impl Packing {
    /// Coefficients between two consecutive rows of a block: n_i' n_o'.
    pub(crate) fn stride(&self) -> usize {
        self.inputs * self.outputs
    }

    pub(crate) fn row_blocks(&self, s: &LinearShape) -> usize {
        s.rows.div_ceil(self.rows)
    }

    pub(crate) fn in_blocks(&self, s: &LinearShape) -> usize {
        s.inputs.div_ceil(self.inputs)
    }

    pub(crate) fn out_blocks(&self, s: &LinearShape) -> usize {
        s.outputs.div_ceil(self.outputs)
    }

    /// Weight terms meeting in one output coefficient's noise: ceil(n_i/n_i') n_i' n_o'.
    #[cfg(test)]
    pub(crate) fn weight_terms(&self, s: &LinearShape) -> usize {
        self.in_blocks(s) * self.stride()
    }

    /// Input coefficient of row b, input j of a block.
    pub(crate) fn input_pos(&self, b: usize, j: usize) -> usize {
        b * self.stride() + j
    }

    /// Weight coefficient of output r, input j of a block.
    pub(crate) fn weight_pos(&self, r: usize, j: usize) -> usize {
        r * self.inputs + self.inputs - 1 - j
    }

    /// Result coefficient of row b, output r of a block.
    pub(crate) fn output_pos(&self, b: usize, r: usize) -> usize {
        b * self.stride() + r * self.inputs + self.inputs - 1
    }

    /// Rows in row block `rb` (the last one may be short).
    pub(crate) fn rows_in(&self, s: &LinearShape, rb: usize) -> usize {
        (s.rows - rb * self.rows).min(self.rows)
    }

    /// Inputs in input block `j`.
    pub(crate) fn inputs_in(&self, s: &LinearShape, j: usize) -> usize {
        (s.inputs - j * self.inputs).min(self.inputs)
    }

    /// Outputs in output block `k`.
    pub(crate) fn outputs_in(&self, s: &LinearShape, k: usize) -> usize {
        (s.outputs - k * self.outputs).min(self.outputs)
    }

    /// Whether this packing is admissible for `s`.
    #[cfg(test)]
    pub(crate) fn valid_for(&self, s: &LinearShape) -> bool {
        (1..=s.rows).contains(&self.rows)
            && (1..=s.inputs).contains(&self.inputs)
            && (1..=s.outputs).contains(&self.outputs)
            && self.rows * self.stride() <= DEGREE
            && self.weight_terms(s) <= 1 << LOG_MAX_WEIGHT_TERMS
    }

    /// The packing that minimises the bytes both ways for `s` under `p` (ties: fewer
    /// ciphertext-plaintext products, then the smaller B'). Deterministic: both parties
    /// compute it.
    pub fn choose(p: &HeParams, s: &LinearShape) -> Result<Self, HeError> {
        s.check()?;
        let mut best: Option<(usize, usize, Packing)> = None;
        for rows in 1..=s.rows.min(DEGREE) {
            for inputs in 1..=s.inputs.min(DEGREE / rows) {
                let in_blocks = s.inputs.div_ceil(inputs);
                // Smallest n_i' giving this many input blocks maximises n_o'.
                if inputs != s.inputs.div_ceil(in_blocks) {
                    continue;
                }
                let by_degree = DEGREE / (rows * inputs);
                let by_noise = (1usize << LOG_MAX_WEIGHT_TERMS) / (in_blocks * inputs);
                let outputs = s.outputs.min(by_degree).min(by_noise);
                if outputs == 0 {
                    continue;
                }
                let cand = Packing {
                    rows,
                    inputs,
                    outputs,
                };
                let bytes = cand.query_bytes(p, s) + cand.response_bytes(p, s);
                let products = cand.row_blocks(s) * in_blocks * cand.out_blocks(s);
                let better = match &best {
                    None => true,
                    Some((b, pr, _)) => bytes < *b || (bytes == *b && products < *pr),
                };
                if better {
                    best = Some((bytes, products, cand));
                }
            }
        }
        best.map(|(_, _, pk)| pk).ok_or(HeError::UnsupportedShape {
            shape: *s,
            reason: "no packing fits the noise budget",
        })
    }

    /// Ciphertexts client -> server.
    pub fn input_cts(&self, s: &LinearShape) -> usize {
        self.row_blocks(s) * self.in_blocks(s)
    }

    /// Ciphertexts server -> client.
    pub fn output_cts(&self, s: &LinearShape) -> usize {
        self.row_blocks(s) * self.out_blocks(s)
    }

    /// Bytes of the query: header + one c0 modulo Q per input ciphertext.
    pub fn query_bytes(&self, p: &HeParams, s: &LinearShape) -> usize {
        QUERY_HEADER_LEN + self.input_cts(s) * p.upload_ct_bytes()
    }

    /// Bytes of one output ciphertext with `kept` result coefficients.
    pub(crate) fn response_ct_bytes(p: &HeParams, kept: usize) -> usize {
        DEGREE * p.c1_bits() as usize / 8 + (kept * p.c0_bits() as usize).div_ceil(8)
    }

    /// Bytes of the response: header + per output ciphertext all of c1 modulo 2^K1 and the
    /// kept coefficients of c0 modulo 2^K0.
    pub fn response_bytes(&self, p: &HeParams, s: &LinearShape) -> usize {
        let mut total = RESPONSE_HEADER_LEN;
        // Row blocks: all full but maybe the last; same for output blocks.
        let rb = self.row_blocks(s);
        let ob = self.out_blocks(s);
        for (rows, nr) in [(self.rows, rb - 1), (self.rows_in(s, rb - 1), 1)] {
            for (outs, no) in [(self.outputs, ob - 1), (self.outputs_in(s, ob - 1), 1)] {
                total += nr * no * Self::response_ct_bytes(p, rows * outs);
            }
        }
        total
    }

    /// The full cost summary.
    pub fn cost(&self, p: &HeParams, s: &LinearShape) -> LayerCost {
        LayerCost {
            packing: *self,
            input_cts: self.input_cts(s),
            output_cts: self.output_cts(s),
            query_bytes: self.query_bytes(p, s),
            response_bytes: self.response_bytes(p, s),
        }
    }
}

/// The bytes each way of one layer call with the packing both parties choose.
pub fn layer_cost(p: &HeParams, s: &LinearShape) -> Result<LayerCost, HeError> {
    Ok(Packing::choose(p, s)?.cost(p, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_do_not_collide() {
        // Brute force: all product terms of one block, only the diagonal ones on kept spots.
        for pk in [
            Packing {
                rows: 3,
                inputs: 5,
                outputs: 4,
            },
            Packing {
                rows: 1,
                inputs: 7,
                outputs: 1,
            },
            Packing {
                rows: 16,
                inputs: 1,
                outputs: 8,
            },
        ] {
            let mut kept = std::collections::HashMap::new();
            for b in 0..pk.rows {
                for r in 0..pk.outputs {
                    kept.insert(pk.output_pos(b, r), (b, r));
                }
            }
            for b in 0..pk.rows {
                for j in 0..pk.inputs {
                    for r in 0..pk.outputs {
                        for j2 in 0..pk.inputs {
                            let e = pk.input_pos(b, j) + pk.weight_pos(r, j2);
                            let e = e % DEGREE; // wrap (sign irrelevant here)
                            if let Some(&(bb, rr)) = kept.get(&e) {
                                assert_eq!((bb, rr, j), (b, r, j2), "{pk:?}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn chosen_packings_fit_and_respect_limits() {
        let p = HeParams::new(37, 37).unwrap();
        for s in [
            LinearShape::new(1, 784, 128),
            LinearShape::new(1, 128, 10),
            LinearShape::new(256, 784, 128),
            LinearShape::new(512, 128, 128),
            LinearShape::new(7, 3, 2),
        ] {
            let pk = Packing::choose(&p, &s).unwrap();
            assert!(pk.valid_for(&s), "{s:?} {pk:?}");
        }
        assert!(matches!(
            Packing::choose(&p, &LinearShape::new(0, 1, 1)),
            Err(HeError::UnsupportedShape { .. })
        ));
        assert!(matches!(
            Packing::choose(&p, &LinearShape::new(4096, 10, 128)),
            Err(HeError::UnsupportedShape { .. })
        ));
    }
}
