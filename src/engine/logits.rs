//! Teacher-forced logits of a token sequence: one full pass, or a prefill then one decode step
//! per later token (the decode path, checked against the same full-pass reference).

use super::{Engine, KvCache, Routing};
use crate::error::{Error, Result};

impl Engine {
    /// Full-sequence prefill from an empty KV cache: logits `[T][vocab]` and routing.
    pub fn logits(&mut self, tokens: &[u32]) -> Result<(Vec<Vec<f32>>, Routing)> {
        self.check_sequence(tokens.len(), 1)?;
        let mut kv = KvCache::with_capacity(tokens.len());
        self.forward(tokens, &mut kv, 0, false)
    }

    /// As [`Engine::logits`], with the first `prefill` tokens in one call and every later one
    /// in a decode step of its own (teacher-forced): the logits of one full pass, through the
    /// decode path (on a GPU, its fused kernels).
    pub fn logits_stepwise(
        &mut self,
        tokens: &[u32],
        prefill: usize,
    ) -> Result<(Vec<Vec<f32>>, Routing)> {
        self.check_sequence(tokens.len(), 1)?;
        if prefill == 0 || prefill > tokens.len() {
            return Err(Error::Input(format!(
                "--prefill {prefill}: between 1 and the {} tokens given",
                tokens.len()
            )));
        }
        let mut kv = KvCache::with_capacity(tokens.len());
        let (mut logits, mut routing) = self.forward(&tokens[..prefill], &mut kv, 0, false)?;
        for (step, &t) in tokens[prefill..].iter().enumerate() {
            let (l, r) = self.forward(&[t], &mut kv, step as u32 + 1, false)?;
            logits.extend(l);
            for ((layer, routes), (l2, more)) in routing.iter_mut().zip(r) {
                debug_assert_eq!(*layer, l2);
                routes.extend(more);
            }
        }
        Ok((logits, routing))
    }
}
