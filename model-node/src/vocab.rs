//! Token ↔ bytes for the three tokenizer families, and the byte trie as a sorted array.
//!
//! Every text token maps to the bytes it stands for: byte-level BPE through GPT-2's byte-to-unicode
//! table; SentencePiece with `▁` as a space and `<0xNN>` as raw bytes; plain vocabularies as their UTF-8.
//! Special tokens (`<s>`, `<|im_end|>`, ...) stand for no text. Sorting the text tokens by their bytes
//! lays the byte trie out depth-first: the tokens starting with any prefix form one contiguous range,
//! so with prefix sums of the probabilities in that order the mass of a subtree is one subtraction.

use std::ops::Range;

use tokenizers::Tokenizer;

/// How tokens map to bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// GPT-2 style byte-level BPE.
    ByteLevel,
    /// SentencePiece style (`▁`, `<0xNN>` byte fallback).
    SentencePiece,
    /// Tokens are their own UTF-8 text.
    Plain,
}

/// Errors building a [`Vocab`].
#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    /// The tokenizer's decoder could not be inspected.
    #[error("cannot inspect the tokenizer's decoder: {0}")]
    Decoder(String),
    /// A byte-level token holds a character outside GPT-2's byte table.
    #[error("token {id} ({token:?}) is not valid byte-level BPE")]
    NotByteLevel {
        /// Token id.
        id: u32,
        /// Token text.
        token: String,
    },
}

/// Bytes of every token and the sorted (trie) order of the text tokens.
#[derive(Debug, Clone)]
pub struct Vocab {
    kind: TokenizerKind,
    bytes: Vec<Option<Box<[u8]>>>,
    /// Text token ids sorted by bytes (then id).
    order: Vec<u32>,
    /// Trie positions of the tokens whose bytes are not valid UTF-8 on their own (byte pieces of
    /// characters): the only tokens that can break a character.
    irregular: Vec<usize>,
    /// `first_byte[b]..first_byte[b + 1]`: trie positions of the tokens starting with byte `b`.
    first_byte: Vec<usize>,
    eos: Vec<u32>,
}

/// GPT-2's byte-to-unicode table, inverted: char → byte.
fn byte_level_table() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .filter_map(|(b, c)| Some((char::from_u32(c)?, u8::try_from(b).ok()?)))
        .collect()
}

fn detect_kind(tok: &Tokenizer) -> Result<TokenizerKind, VocabError> {
    let Some(dec) = tok.get_decoder() else {
        return Ok(TokenizerKind::Plain);
    };
    let json = serde_json::to_string(dec).map_err(|e| VocabError::Decoder(e.to_string()))?;
    Ok(if json.contains("\"ByteLevel\"") {
        TokenizerKind::ByteLevel
    } else if json.contains("\"ByteFallback\"") || json.contains("\"Metaspace\"") || json.contains('▁') {
        TokenizerKind::SentencePiece
    } else {
        TokenizerKind::Plain
    })
}

fn sp_byte(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() == 2 {
        u8::from_str_radix(hex, 16).ok()
    } else {
        None
    }
}

impl Vocab {
    /// Maps every id below `n_rows` (the model's output rows) to bytes; `eos_ids` are the end tokens.
    pub fn from_tokenizer(tok: &Tokenizer, n_rows: usize, eos_ids: &[u32]) -> Result<Self, VocabError> {
        let kind = detect_kind(tok)?;
        let added = tok.get_added_tokens_decoder();
        let table = if kind == TokenizerKind::ByteLevel {
            byte_level_table()
        } else {
            Default::default()
        };
        let mut bytes: Vec<Option<Box<[u8]>>> = vec![None; n_rows];
        for (id, slot) in bytes.iter_mut().enumerate() {
            let id = id as u32;
            let Some(token) = tok.id_to_token(id) else {
                continue;
            };
            if let Some(a) = added.get(&id) {
                // Special tokens are not text; other added tokens are their literal content.
                if !a.special && !a.content.is_empty() {
                    *slot = Some(a.content.as_bytes().into());
                }
                continue;
            }
            let b: Vec<u8> = match kind {
                TokenizerKind::ByteLevel => token
                    .chars()
                    .map(|c| table.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .ok_or_else(|| VocabError::NotByteLevel {
                        id,
                        token: token.clone(),
                    })?,
                TokenizerKind::SentencePiece => match sp_byte(&token) {
                    Some(b) => vec![b],
                    None => token.replace('▁', " ").into_bytes(),
                },
                TokenizerKind::Plain => token.into_bytes(),
            };
            if !b.is_empty() {
                *slot = Some(b.into());
            }
        }
        Ok(Self::from_bytes(kind, bytes, eos_ids))
    }

    /// A vocabulary from raw token bytes (`None`: not text), e.g. for tests.
    pub fn from_bytes(kind: TokenizerKind, bytes: Vec<Option<Box<[u8]>>>, eos_ids: &[u32]) -> Self {
        let n_rows = bytes.len();
        let text = |i: u32| bytes[i as usize].as_ref().is_some_and(|b| !b.is_empty());
        let mut order: Vec<u32> = (0..n_rows as u32).filter(|&i| text(i)).collect();
        order.sort_by(|&a, &b| bytes[a as usize].cmp(&bytes[b as usize]).then(a.cmp(&b)));
        let irregular = order
            .iter()
            .enumerate()
            .filter(|(_, id)| {
                std::str::from_utf8(bytes[**id as usize].as_deref().unwrap_or_default()).is_err()
            })
            .map(|(pos, _)| pos)
            .collect();
        let mut eos: Vec<u32> = eos_ids
            .iter()
            .copied()
            .filter(|&e| (e as usize) < n_rows)
            .collect();
        eos.sort_unstable();
        eos.dedup();
        let first_byte = (0..=256usize)
            .map(|b| {
                order.partition_point(|&id| {
                    bytes[id as usize]
                        .as_deref()
                        .and_then(|x| x.first())
                        .map_or(0, |&x| usize::from(x))
                        < b
                })
            })
            .collect();
        Self {
            kind,
            bytes,
            order,
            irregular,
            first_byte,
            eos,
        }
    }

    /// Trie positions of the tokens whose first byte is in `lo..=hi`.
    pub fn first_byte_block(&self, lo: u8, hi: u8) -> Range<usize> {
        let start = self.first_byte[usize::from(lo)];
        start..self.first_byte[usize::from(hi) + 1].max(start)
    }

    /// Trie positions, ascending, of the tokens that are not valid UTF-8 on their own, within `range`.
    pub fn irregular_in(&self, range: Range<usize>) -> &[usize] {
        let lo = self.irregular.partition_point(|&p| p < range.start);
        let hi = self.irregular.partition_point(|&p| p < range.end);
        &self.irregular[lo..hi]
    }

    /// The tokenizer family.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// Rows of the model's output layer.
    pub fn n_rows(&self) -> usize {
        self.bytes.len()
    }

    /// Number of text tokens (the trie's size).
    pub fn n_text(&self) -> usize {
        self.order.len()
    }

    /// The bytes of `id`; `None` for special and out-of-range tokens.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize)?.as_deref()
    }

    /// End-of-sequence ids.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Whether `id` ends the sequence.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.binary_search(&id).is_ok()
    }

    /// Token id at trie position `pos`.
    pub fn sorted_id(&self, pos: usize) -> u32 {
        self.order[pos]
    }

    /// Bytes of the token at trie position `pos`.
    pub fn sorted_bytes(&self, pos: usize) -> &[u8] {
        self.bytes[self.order[pos] as usize]
            .as_deref()
            .unwrap_or_default()
    }

    /// Trie positions of the tokens whose bytes start with `prefix` (all text tokens for an empty prefix).
    pub fn prefix_range(&self, prefix: &[u8]) -> Range<usize> {
        let Some(&first) = prefix.first() else {
            return 0..self.order.len();
        };
        // The first byte's block comes from a table; only longer prefixes search, within it.
        let block = self.first_byte[first as usize]..self.first_byte[first as usize + 1];
        if prefix.len() == 1 {
            return block;
        }
        let slice = &self.order[block.clone()];
        let key = |id: &u32| self.bytes[*id as usize].as_deref().unwrap_or_default();
        let lo = slice.partition_point(|id| key(id) < prefix);
        let hi = lo + slice[lo..].partition_point(|id| key(id).starts_with(prefix));
        block.start + lo..block.start + hi
    }

    /// Prefix sums (length `n_text + 1`) of `probs` permuted into trie order: the once-per-forward O(V)
    /// pass after which any subtree's mass is `sums[hi] - sums[lo]`.
    pub fn trie_cumsum(&self, probs: &[f32]) -> Vec<f64> {
        let mut sums = Vec::with_capacity(self.order.len() + 1);
        let mut acc = 0.0f64;
        sums.push(acc);
        for &id in &self.order {
            acc += f64::from(probs.get(id as usize).copied().unwrap_or(0.0));
            sums.push(acc);
        }
        sums
    }
}
