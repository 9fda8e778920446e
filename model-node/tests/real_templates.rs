//! Real chat templates from `../shared/real/tokenizers` rendered by the node's minijinja set-up give
//! the exact prompts transformers would (skipped with a note when the material is absent).

use model_node::template::{ChatTemplate, Message};

fn template(family: &str) -> Option<(String, String, String)> {
    let p = format!(
        "{}/../../shared/real/tokenizers/{family}/tokenizer_config.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let Ok(text) = std::fs::read_to_string(&p) else {
        eprintln!("skipping: {p} not found");
        return None;
    };
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_owned();
    Some((s("chat_template"), s("bos_token"), s("eos_token")))
}

fn msgs() -> Vec<Message> {
    vec![
        Message {
            role: "system".into(),
            content: "Answer briefly.".into(),
        },
        Message {
            role: "user".into(),
            content: "What is 2 + 2?".into(),
        },
    ]
}

#[test]
fn qwen2_template_renders_chatml() -> anyhow::Result<()> {
    let Some((src, bos, eos)) = template("qwen2") else {
        return Ok(());
    };
    let t = ChatTemplate::new(Some(src), bos, eos)?;
    assert_eq!(
        t.render(&msgs())?,
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    );
    // Without a system message Qwen2.5 adds its default one.
    let t2 = t.render(&msgs()[1..])?;
    assert!(t2.starts_with("<|im_start|>system\nYou are Qwen"), "{t2}");
    Ok(())
}

#[test]
fn phi3_template_renders_its_tags() -> anyhow::Result<()> {
    let Some((src, bos, eos)) = template("phi3") else {
        return Ok(());
    };
    let t = ChatTemplate::new(Some(src), bos, eos)?;
    assert_eq!(
        t.render(&msgs())?,
        "<|system|>\nAnswer briefly.<|end|>\n<|user|>\nWhat is 2 + 2?<|end|>\n<|assistant|>\n"
    );
    Ok(())
}
