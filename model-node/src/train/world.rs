//! The synthetic world the bundled models learn, generated deterministically from a seed: arithmetic
//! (addition and subtraction of 2–3 digit numbers), an atlas of a fictional world (64 countries × 5
//! attributes = 320 facts, several phrasings each) and a word domain (plurals of invented words, by
//! the English spelling rules). Every item is a one-turn chat question with a short exact answer.
//!
//! Held-out splits: arithmetic operand pairs and words are split by a hash, so an evaluation item
//! never occurs in training; atlas evaluation asks about facts that *are* in training (recall).

use std::collections::BTreeSet;

use ensemble_proto::reasoning;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The three domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Domain {
    /// "What is 347 + 58?" → "405".
    Arithmetic,
    /// "What is the capital of Veloria?" → "Tarn".
    Atlas,
    /// "What is the plural of blarch?" → "blarches".
    Words,
}

impl Domain {
    /// All domains, in a fixed order.
    pub const ALL: [Domain; 3] = [Domain::Arithmetic, Domain::Atlas, Domain::Words];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Domain::Arithmetic => "arithmetic",
            Domain::Atlas => "atlas",
            Domain::Words => "words",
        }
    }
}

/// One question and its exact answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The domain.
    pub domain: Domain,
    /// The user's question.
    pub question: String,
    /// The expected answer (exact match).
    pub answer: String,
    /// Work the model shows before the answer (arithmetic), without the block's markers.
    pub reasoning: Option<String>,
}

impl Item {
    /// What a model is trained to write: the reasoning block when there is one, then the answer.
    pub fn response(&self) -> String {
        match &self.reasoning {
            Some(r) => format!("{}{r}{}{}", reasoning::START, reasoning::END, self.answer),
            None => self.answer.clone(),
        }
    }
}

/// The worked form of `a op b = result`, as column arithmetic on paper: the operands right-aligned
/// (zero-padded to 3 digits), then the result's digits units first, each from one column and the
/// carry just written: `347+058=504` for 347 + 58 = 405.
fn worked(a: u32, op: char, b: u32, result: u32) -> String {
    let units_first: String = format!("{result:03}").chars().rev().collect();
    format!("{a:03}{op}{b:03}={units_first}")
}

/// The answer part of a response: the text after a leading reasoning block (all of it when there
/// is none; nothing when the block never closes).
pub fn strip_reasoning(text: &str) -> &str {
    reasoning::split(text).map_or(text, |(_, answer)| answer)
}

/// A fictional country and its facts.
#[derive(Debug, Clone)]
pub struct Country {
    /// Its name ("Veloria").
    pub name: String,
    /// Capital city.
    pub capital: String,
    /// Currency.
    pub currency: String,
    /// Longest river.
    pub river: String,
    /// Official language.
    pub language: String,
    /// Population band.
    pub population: &'static str,
}

/// The atlas attributes.
pub const ATTRIBUTES: [&str; 5] = ["capital", "currency", "river", "language", "population"];

const POPULATION: [&str; 4] = [
    "under 1 million",
    "1 to 5 million",
    "5 to 20 million",
    "over 20 million",
];
const ONSETS: [&str; 24] = [
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kl", "st", "tr",
    "th", "sh", "ch", "qu",
];
const VOWELS: [&str; 8] = ["a", "e", "i", "o", "u", "ai", "ea", "ou"];
const CODAS: [&str; 12] = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "x", "sh", "ch"];
const COUNTRY_ENDS: [&str; 6] = ["ia", "land", "ora", "istan", "ary", "en"];
const CURRENCY_KINDS: [&str; 5] = ["crown", "mark", "dinar", "florin", "shell"];
const LANGUAGE_ENDS: [&str; 4] = ["ish", "ese", "ic", "an"];
/// Endings that make plurals interesting (consonant+y → ies, sibilants → es, otherwise s).
const WORD_ENDS: [&str; 10] = ["y", "ay", "ch", "sh", "x", "s", "z", "t", "p", "o"];

fn syllable(rng: &mut StdRng) -> String {
    let mut s = String::new();
    s.push_str(ONSETS.choose(rng).copied().unwrap_or("b"));
    s.push_str(VOWELS.choose(rng).copied().unwrap_or("a"));
    s
}

fn stem(rng: &mut StdRng, syllables: usize) -> String {
    let mut s: String = (0..syllables).map(|_| syllable(rng)).collect();
    s.push_str(CODAS.choose(rng).copied().unwrap_or(""));
    s
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// The English plural of a (regular) word.
pub fn plural(word: &str) -> String {
    let b = word.as_bytes();
    let vowel = |c: u8| b"aeiou".contains(&c);
    if word.ends_with('y') && b.len() >= 2 && !vowel(b[b.len() - 2]) {
        format!("{}ies", &word[..word.len() - 1])
    } else if ["s", "x", "z", "ch", "sh", "o"].iter().any(|e| word.ends_with(e)) {
        format!("{word}es")
    } else {
        format!("{word}s")
    }
}

/// FNV-1a, for stable held-out splits.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The world: countries, invented words and the held-out rule.
#[derive(Debug, Clone)]
pub struct World {
    /// The atlas.
    pub countries: Vec<Country>,
    /// Invented words (train and held-out together).
    pub words: Vec<String>,
    seed: u64,
}

impl World {
    /// Generates the world of `seed`.
    pub fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut used = BTreeSet::new();
        let mut fresh = |rng: &mut StdRng, f: &dyn Fn(&mut StdRng) -> String| loop {
            let s = f(rng);
            if used.insert(s.to_lowercase()) {
                break s;
            }
        };
        let mut countries = Vec::new();
        for i in 0..64 {
            let name = fresh(&mut rng, &|r| {
                let n = r.random_range(1..=2);
                capitalise(&format!(
                    "{}{}",
                    stem(r, n),
                    COUNTRY_ENDS.choose(r).copied().unwrap_or("ia")
                ))
            });
            let capital = fresh(&mut rng, &|r| {
                let n = r.random_range(1..=2);
                capitalise(&stem(r, n))
            });
            let currency = fresh(&mut rng, &|r| {
                let kind = CURRENCY_KINDS.choose(r).copied().unwrap_or("crown");
                format!("{} {kind}", capitalise(&stem(r, 1)))
            });
            let river = fresh(&mut rng, &|r| {
                let n = r.random_range(1..=2);
                capitalise(&stem(r, n))
            });
            let root: String = name.chars().take(4).collect();
            let language = fresh(&mut rng, &|r| {
                format!("{root}{}", LANGUAGE_ENDS.choose(r).copied().unwrap_or("ish"))
            });
            countries.push(Country {
                name,
                capital,
                currency,
                river,
                language,
                population: POPULATION[(i * 7 + seed as usize) % POPULATION.len()],
            });
        }
        let mut words = Vec::new();
        while words.len() < 1200 {
            let w = fresh(&mut rng, &|r| {
                let n = r.random_range(1..=2);
                let mut s: String = (0..n).map(|_| syllable(r)).collect();
                s.push_str(WORD_ENDS.choose(r).copied().unwrap_or("t"));
                s
            });
            words.push(w);
        }
        Self {
            countries,
            words,
            seed,
        }
    }

    /// Whether an arithmetic operand pair is held out (about 1 in 8).
    pub fn arithmetic_held_out(&self, a: u32, b: u32, op: char) -> bool {
        fnv(format!("{}:{a}{op}{b}", self.seed).as_bytes()).is_multiple_of(8)
    }

    /// Whether a word is held out (about 1 in 6).
    pub fn word_held_out(&self, w: &str) -> bool {
        fnv(format!("{}:{w}", self.seed).as_bytes()).is_multiple_of(6)
    }

    /// The atlas facts: (country index, attribute, answer).
    pub fn facts(&self) -> Vec<(usize, &'static str, String)> {
        let mut out = Vec::new();
        for (i, c) in self.countries.iter().enumerate() {
            for attr in ATTRIBUTES {
                let ans = match attr {
                    "capital" => c.capital.clone(),
                    "currency" => c.currency.clone(),
                    "river" => c.river.clone(),
                    "language" => c.language.clone(),
                    _ => c.population.to_owned(),
                };
                out.push((i, attr, ans));
            }
        }
        out
    }

    /// An arithmetic item on one side of the split (each operand 2 or 3 digits, evenly).
    pub fn arithmetic(&self, rng: &mut StdRng, held_out: bool) -> Item {
        self.arithmetic_with(rng, held_out, 0.5)
    }

    /// An arithmetic item whose operands have 3 digits with probability `p_three` (else 2): the
    /// trainer's curriculum starts with mostly 2-digit operands.
    pub fn arithmetic_with(&self, rng: &mut StdRng, held_out: bool, p_three: f64) -> Item {
        let p_two = (1.0 - p_three).clamp(0.0, 1.0);
        loop {
            let digits = |r: &mut StdRng| {
                if r.random_bool(p_two) {
                    r.random_range(10..100)
                } else {
                    r.random_range(100..1000)
                }
            };
            let (mut a, mut b) = (digits(rng), digits(rng));
            let op = if rng.random_bool(0.5) { '+' } else { '-' };
            if op == '-' && a < b {
                std::mem::swap(&mut a, &mut b);
            }
            if self.arithmetic_held_out(a, b, op) != held_out {
                continue;
            }
            let answer = if op == '+' { a + b } else { a - b };
            let question = match rng.random_range(0..3) {
                0 => format!("What is {a} {op} {b}?"),
                1 => format!("Compute {a} {op} {b}."),
                _ => format!("{a} {op} {b} = ?"),
            };
            return Item {
                domain: Domain::Arithmetic,
                question,
                answer: answer.to_string(),
                reasoning: Some(worked(a, op, b, answer)),
            };
        }
    }

    /// An atlas question about `country` and `attr`, in a random phrasing.
    pub fn atlas_item(&self, rng: &mut StdRng, country: usize, attr: &str) -> Item {
        let c = &self.countries[country];
        let n = &c.name;
        let pick = |r: &mut StdRng, opts: &[String]| opts.choose(r).cloned().unwrap_or_default();
        let (question, answer) = match attr {
            "capital" => (
                pick(
                    rng,
                    &[
                        format!("What is the capital of {n}?"),
                        format!("Which city is the capital of {n}?"),
                        format!("Name the capital of {n}."),
                    ],
                ),
                c.capital.clone(),
            ),
            "currency" => (
                pick(
                    rng,
                    &[
                        format!("What is the currency of {n}?"),
                        format!("Which currency is used in {n}?"),
                    ],
                ),
                c.currency.clone(),
            ),
            "river" => (
                pick(
                    rng,
                    &[
                        format!("What is the longest river in {n}?"),
                        format!("Which river is the longest in {n}?"),
                    ],
                ),
                c.river.clone(),
            ),
            "language" => (
                pick(
                    rng,
                    &[
                        format!("What language is spoken in {n}?"),
                        format!("What is the official language of {n}?"),
                    ],
                ),
                c.language.clone(),
            ),
            _ => (
                pick(
                    rng,
                    &[
                        format!("What is the population of {n}?"),
                        format!("How many people live in {n}?"),
                    ],
                ),
                c.population.to_owned(),
            ),
        };
        Item {
            domain: Domain::Atlas,
            question,
            answer,
            reasoning: None,
        }
    }

    /// A random atlas question about one of `countries`.
    pub fn atlas(&self, rng: &mut StdRng, countries: &[usize]) -> Item {
        let c = countries.choose(rng).copied().unwrap_or(0);
        let attr = ATTRIBUTES.choose(rng).copied().unwrap_or("capital");
        self.atlas_item(rng, c, attr)
    }

    /// A plural question about a word on one side of the split.
    pub fn words(&self, rng: &mut StdRng, held_out: bool) -> Item {
        loop {
            let Some(w) = self.words.choose(rng) else {
                unreachable_word()
            };
            if self.word_held_out(w) != held_out {
                continue;
            }
            let question = match rng.random_range(0..3) {
                0 => format!("What is the plural of {w}?"),
                1 => format!("Give the plural of {w}."),
                _ => format!("One {w}, two what?"),
            };
            return Item {
                domain: Domain::Words,
                question,
                answer: plural(w),
                reasoning: None,
            };
        }
    }

    /// The held-out evaluation items of `domain` (`n` items, deterministic).
    pub fn eval_set(&self, domain: Domain, n: usize) -> Vec<Item> {
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0xe7a1 ^ (domain as u64) << 32);
        match domain {
            Domain::Arithmetic => (0..n).map(|_| self.arithmetic(&mut rng, true)).collect(),
            Domain::Words => {
                let mut seen = BTreeSet::new();
                let mut out = Vec::new();
                while out.len() < n {
                    let it = self.words(&mut rng, true);
                    if seen.insert(it.answer.clone()) {
                        out.push(it);
                    }
                }
                out
            }
            Domain::Atlas => {
                let mut facts = self.facts();
                facts.shuffle(&mut rng);
                facts
                    .iter()
                    .cycle()
                    .take(n)
                    .map(|(c, attr, _)| self.atlas_item(&mut rng, *c, attr))
                    .collect()
            }
        }
    }
}

fn unreachable_word() -> ! {
    // `World::new` always makes 1200 words.
    panic!("the world has no words")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_big_enough() {
        let (a, b) = (World::new(7), World::new(7));
        assert_eq!(a.facts(), b.facts());
        assert!(a.facts().len() >= 300);
        let names: BTreeSet<_> = a.countries.iter().map(|c| c.name.clone()).collect();
        assert_eq!(names.len(), a.countries.len());
        assert_ne!(World::new(8).countries[0].name, a.countries[0].name);
    }

    #[test]
    fn arithmetic_shows_its_work_and_the_answer_is_what_follows() {
        assert_eq!(worked(347, '+', 58, 405), "347+058=504");
        assert_eq!(worked(58, '-', 47, 11), "058-047=110");
        assert_eq!(worked(902, '+', 412, 1314), "902+412=4131");
        let it = Item {
            domain: Domain::Arithmetic,
            question: "What is 347 + 58?".into(),
            answer: "405".into(),
            reasoning: Some(worked(347, '+', 58, 405)),
        };
        assert_eq!(it.response(), "<think>347+058=504</think>405");
        let w = World::new(5);
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..50 {
            let it = w.arithmetic(&mut rng, false);
            let r = it.response();
            assert!(
                r.starts_with("<think>") && r.ends_with(&format!("</think>{}", it.answer)),
                "{r}"
            );
            assert_eq!(strip_reasoning(&r), it.answer);
        }
        let atlas = w.atlas(&mut rng, &[0]);
        assert_eq!(atlas.response(), atlas.answer);
        assert_eq!(strip_reasoning("Tarn"), "Tarn");
        assert_eq!(strip_reasoning("<think>50"), "");
    }

    #[test]
    fn plurals_follow_the_rules() {
        assert_eq!(plural("blarch"), "blarches");
        assert_eq!(plural("tovy"), "tovies");
        assert_eq!(plural("tray"), "trays");
        assert_eq!(plural("box"), "boxes");
        assert_eq!(plural("kat"), "kats");
    }

    #[test]
    fn held_out_items_never_appear_in_training() {
        let w = World::new(3);
        let mut rng = StdRng::seed_from_u64(1);
        let train: BTreeSet<String> = (0..20_000)
            .map(|_| w.arithmetic(&mut rng, false).question)
            .collect();
        for it in w.eval_set(Domain::Arithmetic, 200) {
            let nums: Vec<&str> = it
                .question
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .collect();
            assert!(!train.iter().any(|q| {
                let t: Vec<&str> = q
                    .split(|c: char| !c.is_ascii_digit())
                    .filter(|s| !s.is_empty())
                    .collect();
                t == nums && q.contains(if it.question.contains('+') { '+' } else { '-' })
            }));
        }
        let train_words: BTreeSet<String> = (0..5000).map(|_| w.words(&mut rng, false).answer).collect();
        for it in w.eval_set(Domain::Words, 100) {
            assert!(!train_words.contains(&it.answer));
        }
    }
}
