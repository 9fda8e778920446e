//! STUB (replaced by the real module)
#![allow(missing_docs, dead_code)]
use crate::vocab::Vocab;
pub trait NextTokenModel {
    type Error;
    fn next_probs(&mut self, tokens: &[u32]) -> Result<std::sync::Arc<[f32]>, Self::Error>;
}
#[derive(Debug, Clone)]
pub struct CharOptions {
    pub max_hypotheses: usize,
    pub min_mass: f64,
    pub lookahead: bool,
}
impl Default for CharOptions {
    fn default() -> Self {
        Self {
            max_hypotheses: 4,
            min_mass: 1e-4,
            lookahead: true,
        }
    }
}
#[derive(Debug, Clone)]
pub struct CharDistribution {
    pub chars: Vec<(char, f64)>,
    pub eos: f64,
    pub residual: f64,
}
pub struct CharState;
impl CharState {
    pub fn new<M: NextTokenModel>(
        _p: Vec<u32>,
        _r: Vec<u8>,
        _o: CharOptions,
        _v: &Vocab,
        _m: &mut M,
    ) -> Result<Self, M::Error> {
        Ok(CharState)
    }
    pub fn commit<M: NextTokenModel>(&mut self, _t: &str, _v: &Vocab, _m: &mut M) -> Result<(), M::Error> {
        Ok(())
    }
    pub fn distribution<M: NextTokenModel>(
        &mut self,
        _k: usize,
        _v: &Vocab,
        _m: &mut M,
    ) -> Result<CharDistribution, M::Error> {
        Ok(CharDistribution {
            chars: vec![],
            eos: 0.0,
            residual: 1.0,
        })
    }
    pub fn hypotheses(&self) -> usize {
        0
    }
}
