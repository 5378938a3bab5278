//! `[prompts]`: prompt files (plain text or JSONL) and inline prompts.

use std::path::Path;

use super::{Prompt, RawPrompts};
use crate::error::{Error, Result};

pub(super) fn read_prompts(file: &Path, base: &Path, p: &RawPrompts) -> Result<Vec<Prompt>> {
    let mut out = Vec::new();
    if let Some(f) = &p.file {
        let path = base.join(f);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let jsonl = path.extension().is_some_and(|x| x == "jsonl");
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if jsonl {
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| Error::format(&path, format!("line {}: {e}", i + 1)))?;
                let text = v.get("prompt").and_then(|t| t.as_str()).ok_or_else(|| {
                    Error::format(
                        &path,
                        format!("line {}: missing string field `prompt`", i + 1),
                    )
                })?;
                let id = v
                    .get("id")
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| x.to_string())
                    })
                    .unwrap_or_else(|| (i + 1).to_string());
                out.push(Prompt {
                    id,
                    source: format!("{}:{}", path.display(), i + 1),
                    text: text.to_string(),
                });
            } else {
                out.push(Prompt {
                    id: (i + 1).to_string(),
                    source: format!("{}:{}", path.display(), i + 1),
                    text: line.replace("\\n", "\n"),
                });
            }
        }
    }
    for (i, t) in p.inline.iter().flatten().enumerate() {
        out.push(Prompt {
            id: format!("inline-{}", i + 1),
            source: format!("{}: prompts.inline[{i}]", file.display()),
            text: t.clone(),
        });
    }
    if out.is_empty() {
        return Err(Error::config(
            file,
            "prompts",
            "no prompts (give `file` or `inline`)",
        ));
    }
    Ok(out)
}
