//! The next-character method on the real tokenizers in `../shared/real/tokenizers` (skipped with a
//! note when absent), with random next-token distributions: the full distribution sums to 1, and the
//! listed characters match a brute-force enumeration of token paths (linear scans, no trie).

use model_node::chars::{CharOptions, CharState, now};
use model_node::fixtures::{RandomModel, brute_prefix};
use model_node::vocab::Vocab;
use std::path::PathBuf;

fn root() -> Option<PathBuf> {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/real/tokenizers"
    ));
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipping: {} not found", p.display());
        None
    }
}

#[test]
fn real_tokenizers_map_known_tokens_to_bytes() -> anyhow::Result<()> {
    let Some(root) = root() else { return Ok(()) };
    let load = |name: &str| -> anyhow::Result<Vocab> {
        let tok = tokenizers::Tokenizer::from_file(root.join(name).join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Vocab::from_tokenizer(&tok, tok.get_vocab_size(true), &[])?)
    };
    let gpt2 = load("gpt2")?;
    assert_eq!(gpt2.token_bytes(262), Some(&b" the"[..]));
    let llama2 = load("llama2")?;
    assert_eq!(llama2.token_bytes(278), Some(&b" the"[..]));
    assert_eq!(llama2.token_bytes(13), Some(&b"\n"[..]));
    assert_eq!(llama2.token_bytes(1), None, "<s> is not text");
    let qwen2 = load("qwen2")?;
    assert_eq!(qwen2.kind(), model_node::vocab::TokenizerKind::ByteLevel);
    assert_eq!(llama2.kind(), model_node::vocab::TokenizerKind::SentencePiece);
    Ok(())
}

#[test]
fn real_tokenizers_char_marginals_sum_to_one_and_match_brute_force() -> anyhow::Result<()> {
    let Some(root) = root() else { return Ok(()) };
    let mut names: Vec<_> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    names.sort();
    assert!(names.len() >= 6);
    for name in names {
        let tok = tokenizers::Tokenizer::from_file(root.join(&name).join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let n = tok.get_vocab_size(true);
        let v = Vocab::from_tokenizer(&tok, n, &[])?;
        for (seed, (text, commits)) in [
            ("The ca", vec!["t", " "]),
            ("Un caf", vec!["é", " "]),
            ("你好，中", vec!["文"]),
            ("smile 😀", vec![" "]),
        ]
        .into_iter()
        .enumerate()
        {
            let ids = tok
                .encode(text, false)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .get_ids()
                .to_vec();
            let (last, rest) = ids.split_last().ok_or_else(|| anyhow::anyhow!("no tokens"))?;
            // A fixed first token stands for the prompt.
            let mut prefix = vec![0u32];
            prefix.extend_from_slice(rest);
            let rem = v.token_bytes(*last).unwrap_or_default().to_vec();
            let mut m = RandomModel {
                n,
                seed: seed as u64,
                scale: 12.0,
            };
            // Default pruning for the sum; (almost) no pruning for the comparison with brute force.
            let Ok(mut st) = now(CharState::new(
                prefix.clone(),
                rem.clone(),
                CharOptions::default(),
                &v,
                &mut m,
            ));
            let exact = CharOptions {
                max_hypotheses: 64,
                min_mass: 1e-12,
                lookahead: true,
            };
            let Ok(mut ex) = now(CharState::new(prefix.clone(), rem.clone(), exact, &v, &mut m));
            let mut committed = rem;
            for step in 0..=commits.len() {
                let Ok(d) = now(st.distribution(1_000_000, &v, &mut m));
                let total: f64 = d.chars.iter().map(|c| c.1).sum::<f64>() + d.eos;
                let what = format!("{name:?} {text:?} step {step}");
                assert!(
                    (total - 1.0).abs() < 1e-5 && d.residual < 1e-5,
                    "{what}: total {total}, residual {}",
                    d.residual
                );
                // Brute force on the two most likely characters: their ratio.
                let Ok(d) = now(ex.distribution(2, &v, &mut m));
                if d.chars.len() >= 2 {
                    let mass = |m: &mut RandomModel, c: char| {
                        let mut need = committed.clone();
                        need.extend_from_slice(c.to_string().as_bytes());
                        brute_prefix(m, &v, &prefix, &need)
                    };
                    let (a, b) = (mass(&mut m, d.chars[0].0), mass(&mut m, d.chars[1].0));
                    let (got, want) = (d.chars[1].1 / d.chars[0].1, b / a);
                    assert!(
                        (got - want).abs() <= 1e-5 * want.max(1e-12) + 1e-9,
                        "{what}: {got} vs {want}"
                    );
                }
                if let Some(c) = commits.get(step) {
                    let Ok(()) = now(st.commit(c, &v, &mut m));
                    if st.hypotheses() == 0 {
                        // Every kept path died (beam pruning): rebuild from the canonical tokenization,
                        // as the engine does.
                        let full = format!("{text}{}", commits[..=step].concat());
                        let ids = tok
                            .encode(full.as_str(), false)
                            .map_err(|e| anyhow::anyhow!("{e}"))?
                            .get_ids()
                            .to_vec();
                        let (last, rest) = ids.split_last().ok_or_else(|| anyhow::anyhow!("no tokens"))?;
                        let mut p = vec![0u32];
                        p.extend_from_slice(rest);
                        let r = v.token_bytes(*last).unwrap_or_default().to_vec();
                        let Ok(fresh) = now(CharState::new(p, r, CharOptions::default(), &v, &mut m));
                        st = fresh;
                    }
                    let Ok(()) = now(ex.commit(c, &v, &mut m));
                    committed.extend_from_slice(c.as_bytes());
                }
            }
        }
    }
    Ok(())
}
