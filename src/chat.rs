//! Chat templates: renders a prompt as a one-turn conversation with the Jinja template of the
//! model's `tokenizer_config.json` (`chat_template`), the way HF `apply_chat_template` does with
//! `add_generation_prompt=True`.

use std::path::Path;

use crate::error::{Error, Result};

/// A loaded chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    source: String,
    bos: String,
    eos: String,
    path: std::path::PathBuf,
}

impl ChatTemplate {
    /// Reads `tokenizer_config.json` of a model directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
        let source = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            // Some checkpoints list named templates: take `default`.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|t| t.as_str()))
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::config(&path, "chat_template", "no template named `default`")
                })?,
            _ => {
                return Err(Error::config(
                    &path,
                    "chat_template",
                    "missing: this model has no chat template (set `chat_template = false`)",
                ))
            }
        };
        let tok = |k: &str| match v.get(k) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .unwrap_or("")
                .to_string(),
            None => String::new(),
        };
        Ok(ChatTemplate {
            source,
            bos: tok("bos_token"),
            eos: tok("eos_token"),
            path,
        })
    }

    /// Renders one user turn followed by the generation prompt.
    pub fn render(&self, user: &str) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| Error::config(&self.path, "chat_template", e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::config(&self.path, "chat_template", e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => vec![minijinja::context! { role => "user", content => user }],
            add_generation_prompt => true,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
        })
        .map_err(|e| {
            Error::config(
                &self.path,
                "chat_template",
                format!("rendering failed: {e}"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_user_turn() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<s>", "chat_template": "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content.strip() }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"}"#,
        )
        .unwrap();
        let t = ChatTemplate::load(d.path()).unwrap();
        assert_eq!(t.render("  hi ").unwrap(), "<s><|user|>hi<|assistant|>");
        std::fs::write(d.path().join("tokenizer_config.json"), "{}").unwrap();
        assert!(ChatTemplate::load(d.path())
            .unwrap_err()
            .to_string()
            .contains("chat_template"));
    }
}
