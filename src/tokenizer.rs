//! The CLIP tokenizer (spec §3): `tokenizer.json` from the model directory, or the embedded
//! copy, through the `tokenizers` crate; the prompt template; the first-EOS position used for
//! pooling.

use crate::error::{Error, Result};
use std::path::Path;

/// The CLIP BPE tokenizer (OpenAI CLIP vocabulary, MIT; see `assets/NOTICE.md`), embedded as the
/// default when a model directory has no `tokenizer.json`.
pub const EMBEDDED_TOKENIZER_JSON: &[u8] = include_bytes!("../assets/tokenizer.json");

/// A CLIP tokenizer plus the prompt template.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    template: String,
    max_positions: usize,
    /// Where it came from, for messages.
    pub source: String,
}

/// One tokenised prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// The templated sentence.
    pub sentence: String,
    pub ids: Vec<u32>,
    /// Index of the first occurrence of the largest id (the EOS token): what
    /// `input_ids.argmax(-1)` pools (spec §3, pitfall 16).
    pub eos: usize,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from `dir` if it exists, else the embedded tokenizer.
    pub fn for_model_dir(dir: Option<&Path>, template: &str, max_positions: usize) -> Result<Self> {
        if let Some(path) = dir
            .map(|d| d.join("tokenizer.json"))
            .filter(|p| p.is_file())
        {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            return Self::from_bytes(&bytes, &path.display().to_string(), template, max_positions);
        }
        Self::from_bytes(
            EMBEDDED_TOKENIZER_JSON,
            "embedded CLIP tokenizer",
            template,
            max_positions,
        )
    }

    /// Parses a `tokenizer.json`.
    pub fn from_bytes(
        bytes: &[u8],
        source: &str,
        template: &str,
        max_positions: usize,
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::format(source, format!("not a valid tokenizer.json: {e}")))?;
        Ok(TextTokenizer {
            inner,
            template: template.to_string(),
            max_positions,
            source: source.to_string(),
        })
    }

    /// Checks that every id of the tokenizer's vocabulary (added tokens included) is below
    /// `vocab`, the text model's embedding rows: an id beyond it would index past the table.
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        let bad = self
            .inner
            .get_vocab(true)
            .into_iter()
            .filter(|(_, id)| *id as usize >= vocab)
            .max_by_key(|(_, id)| *id);
        if let Some((token, id)) = bad {
            let mut token = token;
            if token.chars().count() > 40 {
                token = token.chars().take(40).collect::<String>() + "…";
            }
            return Err(Error::format(
                &self.source,
                format!(
                    "token {token:?} has id {id}, outside the text model's vocabulary of {vocab} (architecture.text.vocab)"
                ),
            ));
        }
        Ok(())
    }

    /// Tokenises the template filled with `category` (verbatim, as the official code does).
    pub fn encode(&self, category: &str) -> Result<Tokens> {
        if category.trim().is_empty() {
            return Err(Error::Prompt("the text prompt is empty".into()));
        }
        let sentence = self.template.replace("{}", category);
        let enc = self
            .inner
            .encode(sentence.as_str(), true)
            .map_err(|e| Error::Prompt(format!("cannot tokenise {sentence:?}: {e}")))?;
        let ids = enc.get_ids().to_vec();
        if ids.len() > self.max_positions {
            return Err(Error::Prompt(format!(
                "text {category:?} gives {} tokens; the text encoder takes at most {}",
                ids.len(),
                self.max_positions
            )));
        }
        let max = *ids
            .iter()
            .max()
            .ok_or_else(|| Error::Prompt(format!("text {category:?} gives no tokens")))?;
        let eos = ids.iter().position(|&i| i == max).unwrap();
        Ok(Tokens { sentence, ids, eos })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> TextTokenizer {
        TextTokenizer::for_model_dir(None, crate::config::DEFAULT_TEMPLATE, 77).unwrap()
    }

    #[test]
    fn golden_ids_from_the_spec() {
        let t = tok();
        let liver = t.encode("liver").unwrap();
        assert_eq!(
            liver.ids,
            [49406, 320, 11639, 704, 7690, 999, 22399, 539, 320, 12639, 269, 49407]
        );
        assert_eq!(liver.eos, 11);
        assert_eq!(
            &t.encode("left kidney").unwrap().ids[8..],
            [320, 1823, 14610, 269, 49407]
        );
        assert_eq!(
            &t.encode("inferior vena cava").unwrap().ids[8..],
            [320, 16258, 2498, 47442, 48682, 269, 49407]
        );
        assert_eq!(
            &t.encode("kidney tumor").unwrap().ids[8..],
            [320, 14610, 22616, 269, 49407]
        );
    }

    #[test]
    fn ids_beyond_the_vocabulary_are_refused() {
        let t = tok();
        t.check_vocab(49408).unwrap();
        let msg = t.check_vocab(49407).unwrap_err().to_string();
        assert!(msg.contains("id 49407"), "{msg}");
        assert!(msg.contains("vocabulary of 49407"), "{msg}");
    }

    #[test]
    fn bad_text_is_an_error() {
        let t = tok();
        assert!(t.encode("   ").is_err());
        let long = "liver ".repeat(80);
        let msg = t.encode(&long).unwrap_err().to_string();
        assert!(msg.contains("at most 77"), "{msg}");
    }
}
