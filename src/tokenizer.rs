//! (in progress)

/// The CLIP BPE tokenizer (OpenAI CLIP vocabulary, MIT; see `assets/NOTICE.md`), embedded as the
/// default when a model directory has no `tokenizer.json`.
pub const EMBEDDED_TOKENIZER_JSON: &[u8] = include_bytes!("../assets/tokenizer.json");
