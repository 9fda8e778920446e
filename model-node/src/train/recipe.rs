//! The three bundled recipes. Each model has its own tokenizer family, chat template and architecture,
//! like models of different families, and its own mix of the world's domains:
//!
//! | recipe  | tokenizer                         | template  | arch    | mix (arith/atlas/words) |
//! |---------|-----------------------------------|-----------|---------|-------------------------|
//! | arith   | character-level                   | Phi-3     | llama   | 0.90 / 0.05 / 0.05 (atlas: 12 of 64 countries) |
//! | atlas   | SentencePiece BPE, byte fallback  | Llama-2   | qwen2   | 0.12 / 0.78 / 0.10      |
//! | general | byte-level BPE                    | ChatML    | mistral | 0.30 / 0.20 / 0.50 (atlas: 40 of 64 countries; smaller) |
//!
//! Every model sees every domain's format, so that outside its specialty it spreads its mass over
//! plausible answers instead of being confidently wrong.

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokenizers::{AddedToken, Tokenizer};

use super::model::Shape;
use super::world::World;
use super::{Result, TrainError};
use crate::fixtures;

/// Which tokenizer family a recipe uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// One token per character.
    Char,
    /// SentencePiece-style BPE with `▁` and `<0xNN>` byte fallback.
    SentencePiece,
    /// GPT-2 style byte-level BPE.
    ByteLevel,
}

/// How to train one bundled model.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Name (and directory under `models/`).
    pub name: &'static str,
    /// One line on what the model is for.
    pub description: &'static str,
    /// Tokenizer family.
    pub tokenizer: TokenizerKind,
    /// Vocabulary size for the BPE families.
    pub vocab: usize,
    /// Jinja chat template.
    pub template: &'static str,
    /// Model shape (`vocab` is filled from the tokenizer).
    pub shape: Shape,
    /// Probability of arithmetic, atlas, words in a batch.
    pub mix: [f64; 3],
    /// How many of the atlas's countries it learns facts about (the rest it never sees).
    pub atlas_countries: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Initialisation and sampling seed.
    pub seed: u64,
}

impl Recipe {
    /// Indices of the countries this recipe trains on.
    pub fn countries(&self, world: &World) -> Vec<usize> {
        (0..world.countries.len().min(self.atlas_countries)).collect()
    }
}

/// Phi-3 style template (character-level model).
pub const PHI3_TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";
/// Llama-2 style template (SentencePiece model); the answer follows `[/INST] `.
pub const LLAMA2_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}<<SYS>> {{ m.content }} <</SYS>> {% elif m.role == 'user' %}[INST] {{ m.content }} [/INST] {% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}";

/// The bundled recipes, by name.
pub fn recipes() -> Vec<Recipe> {
    vec![
        Recipe {
            name: "arith",
            description: "arithmetic specialist: character-level tokenizer, Llama architecture",
            tokenizer: TokenizerKind::Char,
            vocab: 0,
            template: PHI3_TEMPLATE,
            shape: Shape {
                arch: "llama",
                vocab: 0,
                hidden: 128,
                layers: 4,
                heads: 8,
                intermediate: 256,
                max_positions: 256,
            },
            mix: [0.9, 0.05, 0.05],
            atlas_countries: 12,
            steps: 2500,
            batch: 48,
            lr: 3e-3,
            seed: 11,
        },
        Recipe {
            name: "atlas",
            description: "atlas specialist: SentencePiece BPE with byte fallback, Qwen2 architecture",
            tokenizer: TokenizerKind::SentencePiece,
            vocab: 1024,
            template: LLAMA2_TEMPLATE,
            shape: Shape {
                arch: "qwen2",
                vocab: 0,
                hidden: 96,
                layers: 3,
                heads: 4,
                intermediate: 256,
                max_positions: 256,
            },
            mix: [0.12, 0.78, 0.1],
            atlas_countries: usize::MAX,
            steps: 1500,
            batch: 48,
            lr: 2e-3,
            seed: 22,
        },
        Recipe {
            name: "general",
            description: "weaker generalist: byte-level BPE, Mistral architecture, all three domains",
            tokenizer: TokenizerKind::ByteLevel,
            vocab: 768,
            template: fixtures::CHATML,
            shape: Shape {
                arch: "mistral",
                vocab: 0,
                hidden: 96,
                layers: 2,
                heads: 4,
                intermediate: 256,
                max_positions: 256,
            },
            mix: [0.3, 0.2, 0.5],
            atlas_countries: 40,
            steps: 1500,
            batch: 48,
            lr: 2e-3,
            seed: 33,
        },
    ]
}

/// The recipe called `name`.
pub fn recipe(name: &str) -> Result<Recipe> {
    recipes().into_iter().find(|r| r.name == name).ok_or_else(|| {
        TrainError::Other(format!(
            "unknown recipe {name:?}: expected arith, atlas or general"
        ))
    })
}

/// A built tokenizer with its special tokens.
pub struct Tokenizers {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// BOS text.
    pub bos: Option<String>,
    /// EOS text (ends an answer).
    pub eos: String,
    /// Every token that ends generation.
    pub eos_all: Vec<String>,
}

/// Text the tokenizers are trained on: every fact, every word, and many rendered questions.
fn corpus(world: &World) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(0xc0);
    let mut out = Vec::new();
    for (c, attr, _) in world.facts() {
        let it = world.atlas_item(&mut rng, c, attr);
        out.push(format!("{} {}", it.question, it.response()));
    }
    for _ in 0..2000 {
        let it = world.arithmetic(&mut rng, false);
        out.push(format!("{} {}", it.question, it.response()));
        let it = world.words(&mut rng, false);
        out.push(format!("{} {}", it.question, it.response()));
    }
    for w in &world.words {
        out.push(format!("{w} {}", super::world::plural(w)));
    }
    // Template text, with the newline that separates roles.
    out.push("[INST] <<SYS>> <</SYS>> [/INST] user assistant system\n".into());
    out
}

fn add_specials(tok: &mut Tokenizer, specials: &[&str]) -> Result<()> {
    let added: Vec<AddedToken> = specials
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    tok.add_special_tokens(added)
        .map_err(|e| TrainError::Other(format!("tokenizer: {e}")))?;
    Ok(())
}

/// Builds the recipe's tokenizer on the world's text.
pub fn build_tokenizer(recipe: &Recipe, world: &World) -> Result<Tokenizers> {
    let text = corpus(world);
    let refs: Vec<&str> = text.iter().map(String::as_str).collect();
    Ok(match recipe.tokenizer {
        TokenizerKind::Char => {
            let mut tok = fixtures::char_level(&refs)?;
            add_specials(&mut tok, &["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])?;
            Tokenizers {
                tokenizer: tok,
                bos: Some("<bos>".into()),
                eos: "<|end|>".into(),
                eos_all: vec!["<|end|>".into(), "<eos>".into()],
            }
        }
        TokenizerKind::SentencePiece => Tokenizers {
            // The Llama-2 template's markers, often enough to become pieces of their own.
            tokenizer: fixtures::sentencepiece_bpe(
                &refs
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n("[INST] [/INST] [INST] [/INST]", 200))
                    .collect::<Vec<_>>(),
                recipe.vocab,
            )?,
            bos: Some("<s>".into()),
            eos: "</s>".into(),
            eos_all: vec!["</s>".into()],
        },
        TokenizerKind::ByteLevel => Tokenizers {
            tokenizer: fixtures::byte_level_bpe(&refs, recipe.vocab)?,
            bos: None,
            eos: "<|im_end|>".into(),
            eos_all: vec!["<|im_end|>".into(), "<|endoftext|>".into()],
        },
    })
}
