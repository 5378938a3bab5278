//! Token sampling: greedy, or softmax at a temperature from a seeded generator.

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::models::layers::argmax;

/// Token sampling.
#[derive(Debug)]
pub enum Sampler {
    /// Argmax.
    Greedy,
    /// Softmax at a temperature, seeded.
    Temperature {
        /// Temperature (> 0).
        t: f32,
        /// Seeded generator.
        rng: Box<StdRng>,
    },
}

impl Sampler {
    /// Greedy when `temperature` is 0, else seeded sampling.
    pub fn new(temperature: f32, seed: u64) -> Self {
        if temperature <= 0.0 {
            Sampler::Greedy
        } else {
            Sampler::Temperature {
                t: temperature,
                rng: Box::new(StdRng::seed_from_u64(seed)),
            }
        }
    }
    /// Whether this is [`Sampler::Greedy`] (its token can be chosen where the logits are).
    pub fn is_greedy(&self) -> bool {
        matches!(self, Sampler::Greedy)
    }
    /// Picks the next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self {
            Sampler::Greedy => argmax(logits) as u32,
            Sampler::Temperature { t, rng } => {
                let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let p: Vec<f64> = logits
                    .iter()
                    .map(|&l| (((l - m) / *t) as f64).exp())
                    .collect();
                let mut r = rng.random::<f64>() * p.iter().sum::<f64>();
                for (i, &pi) in p.iter().enumerate() {
                    r -= pi;
                    if r <= 0.0 {
                        return i as u32;
                    }
                }
                (p.len() - 1) as u32
            }
        }
    }
}
