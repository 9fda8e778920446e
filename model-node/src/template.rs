//! Chat templates: `tokenizer_config.json`'s Jinja `chat_template` rendered with minijinja (with the
//! Python-compatible string methods templates rely on), or a plain `role: content` fallback.

use minijinja::{Environment, context};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A message as templates see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    /// Text.
    pub content: String,
}

/// Renders conversations into the prompt text that precedes the assistant's answer.
pub struct ChatTemplate {
    env: Option<Environment<'static>>,
    bos: String,
    eos: String,
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source` (None: the plain fallback). Fails on a template that does not parse.
    pub fn new(source: Option<String>, bos: String, eos: String) -> Result<Self> {
        let env = match source {
            None => None,
            Some(src) => {
                let mut env = Environment::new();
                minijinja_contrib::add_to_environment(&mut env);
                env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
                env.add_function("raise_exception", raise_exception);
                // transformers renders chat templates with trim_blocks and lstrip_blocks.
                let syntax = minijinja::syntax::SyntaxConfig::builder()
                    .trim_blocks(true)
                    .lstrip_blocks(true)
                    .build()
                    .map_err(|e| Error::ModelDir(format!("template syntax: {e}")))?;
                env.set_syntax(syntax);
                env.add_template_owned("chat", src)
                    .map_err(|e| Error::ModelDir(format!("chat_template does not parse: {e}")))?;
                Some(env)
            }
        };
        Ok(Self { env, bos, eos })
    }

    /// Whether a real template (not the fallback) is used.
    pub fn has_template(&self) -> bool {
        self.env.is_some()
    }

    /// The prompt text for `messages`, ending where the assistant's answer starts.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        match &self.env {
            Some(env) => {
                let tmpl = env
                    .get_template("chat")
                    .map_err(|e| Error::Template(e.to_string()))?;
                tmpl.render(context! {
                    messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                    add_generation_prompt => true,
                    bos_token => self.bos.as_str(),
                    eos_token => self.eos.as_str(),
                })
                .map_err(|e| Error::Template(format!("rendering failed: {e}")))
            }
            None => {
                let mut s = self.bos.clone();
                for m in messages {
                    s.push_str(&m.role);
                    s.push_str(": ");
                    s.push_str(&m.content);
                    s.push('\n');
                }
                s.push_str("assistant: ");
                Ok(s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<Message> {
        vec![
            Message {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            Message {
                role: "user".into(),
                content: "Hi".into(),
            },
        ]
    }

    #[test]
    fn chatml_template_renders() -> Result<()> {
        let src = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(Some(src.into()), String::new(), "<|im_end|>".into())?;
        assert_eq!(
            t.render(&msgs())?,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        Ok(())
    }

    #[test]
    fn fallback_is_plain() -> Result<()> {
        let t = ChatTemplate::new(None, "<s>".into(), "</s>".into())?;
        assert_eq!(t.render(&msgs())?, "<s>system: Be brief.\nuser: Hi\nassistant: ");
        Ok(())
    }

    #[test]
    fn template_errors_are_reported() -> Result<()> {
        let src = "{{ raise_exception('only user and assistant roles') }}";
        let t = ChatTemplate::new(Some(src.into()), String::new(), String::new())?;
        let err = t.render(&msgs()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("only user and assistant roles"), "{err}");
        assert!(ChatTemplate::new(Some("{% for %}".into()), String::new(), String::new()).is_err());
        Ok(())
    }
}
