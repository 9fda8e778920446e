//! Input size limits, checked on the decoded request before anything is tokenized or copied to
//! the members: the same check guards the coordinator (gRPC and HTTP) and every node, so an oversized
//! prompt costs its bytes once and is refused with a message naming the limit that was crossed.

use crate::v1 as pb;

/// Most bytes of an offending value quoted back in an error message.
pub const QUOTE_BYTES: usize = 64;

/// Size limits on one request's text; see the README's configuration tables for where each is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Most bytes in one message's content, a raw prompt, or an answer so far.
    pub max_message_bytes: usize,
    /// Most messages in one conversation.
    pub max_messages: usize,
    /// Most bytes of prompt text in all (every message's role and content, or the raw prompt, and
    /// the answer so far).
    pub max_prompt_bytes: usize,
    /// Most bytes of one encoded request (gRPC message or HTTP body); larger ones are refused before
    /// they are decoded.
    pub max_request_bytes: usize,
}

impl Default for InputLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 256 << 10,
            max_messages: 1024,
            max_prompt_bytes: 1 << 20,
            max_request_bytes: 4 << 20,
        }
    }
}

/// The longest prefix of `s` of at most [`QUOTE_BYTES`] bytes (on a character boundary), with `…`
/// and the full length when cut: what an error may echo of a client's value.
pub fn quote(s: &str) -> String {
    if s.len() <= QUOTE_BYTES {
        return format!("{s:?}");
    }
    let mut end = QUOTE_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

impl InputLimits {
    /// Checks a prompt and the answer so far; `Err` is a message naming the limit crossed
    /// (`INVALID_ARGUMENT`: the client's to shorten).
    pub fn check_prompt(&self, prompt: &pb::Prompt, answer: &str) -> Result<(), String> {
        let mut total = self.check_text("the answer so far", answer)?;
        match &prompt.kind {
            None => {}
            Some(pb::prompt::Kind::Raw(raw)) => total += self.check_text("the raw prompt", raw)?,
            Some(pb::prompt::Kind::Conversation(c)) => {
                if c.messages.len() > self.max_messages {
                    return Err(format!(
                        "the conversation has {} messages; the limit is {} (max_messages)",
                        c.messages.len(),
                        self.max_messages
                    ));
                }
                for (i, m) in c.messages.iter().enumerate() {
                    total += self.check_text(&format!("message {i}"), &m.content)?;
                    total += m.role.len();
                }
            }
        }
        self.check_total(total)
    }

    /// Checks text appended to a session (a delta): one message's worth at most.
    pub fn check_append(&self, append: &str) -> Result<(), String> {
        self.check_text("the appended text", append).map(drop)
    }

    fn check_text(&self, what: &str, text: &str) -> Result<usize, String> {
        if text.len() > self.max_message_bytes {
            return Err(format!(
                "{what} is {} bytes; the limit is {} bytes per message (max_message_bytes)",
                text.len(),
                self.max_message_bytes
            ));
        }
        Ok(text.len())
    }

    fn check_total(&self, total: usize) -> Result<(), String> {
        if total > self.max_prompt_bytes {
            return Err(format!(
                "the prompt is {total} bytes in all; the limit is {} bytes (max_prompt_bytes)",
                self.max_prompt_bytes
            ));
        }
        Ok(())
    }

    /// Checks the settings themselves: every limit at least 1, and one message fits in a prompt.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_message_bytes == 0
            || self.max_messages == 0
            || self.max_prompt_bytes == 0
            || self.max_request_bytes == 0
        {
            return Err("input limits must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(contents: &[&str]) -> pb::Prompt {
        pb::Prompt {
            kind: Some(pb::prompt::Kind::Conversation(pb::Conversation {
                messages: contents
                    .iter()
                    .map(|c| pb::ChatMessage {
                        role: "user".into(),
                        content: (*c).into(),
                    })
                    .collect(),
            })),
        }
    }

    #[test]
    fn each_limit_is_named_when_crossed() {
        let l = InputLimits {
            max_message_bytes: 10,
            max_messages: 3,
            max_prompt_bytes: 30,
            max_request_bytes: 100,
        };
        assert!(l.check_prompt(&chat(&["0123456789", "x"]), "").is_ok());
        let e = l
            .check_prompt(&chat(&["x", "01234567890"]), "")
            .expect_err("refused");
        assert!(
            e.starts_with("message 1 is 11 bytes") && e.contains("max_message_bytes"),
            "{e}"
        );
        let e = l
            .check_prompt(&chat(&["a", "b", "c", "d"]), "")
            .expect_err("refused");
        assert!(e.contains("4 messages") && e.contains("max_messages"), "{e}");
        // 3 × (10 + 4 role bytes) = 42 > 30.
        let e = l
            .check_prompt(&chat(&["0123456789", "0123456789", "0123456789"]), "")
            .expect_err("refused");
        assert!(
            e.contains("42 bytes in all") && e.contains("max_prompt_bytes"),
            "{e}"
        );
        let e = l.check_prompt(&chat(&["x"]), "01234567890").expect_err("refused");
        assert!(e.starts_with("the answer so far"), "{e}");
        let raw = pb::Prompt {
            kind: Some(pb::prompt::Kind::Raw("0123456789".repeat(2))),
        };
        assert!(
            l.check_prompt(&raw, "")
                .expect_err("refused")
                .starts_with("the raw prompt")
        );
        assert!(l.check_append("01234567890").is_err());
    }

    #[test]
    fn quotes_are_short_and_cut_on_a_character() {
        assert_eq!(quote("abc"), "\"abc\"");
        let long = "é".repeat(1000);
        let q = quote(&long);
        assert!(q.len() < QUOTE_BYTES + 40, "{q}");
        assert!(q.ends_with("(2000 bytes)"), "{q}");
    }
}
