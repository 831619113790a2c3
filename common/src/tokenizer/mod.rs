//! Tokenizers built from GGUF metadata.
//!
//! Four tokenizer models are supported (`tokenizer.ggml.model`): byte-level BPE (`"gpt2"`, e.g.
//! SmolLM2, Llama 3, Qwen 2) with the pre-tokenizer the vocabulary names
//! (`tokenizer.ggml.pre`, see [`pretokenize`]); SentencePiece-style BPE with byte fallback
//! (`"llama"`, e.g. Gemma 3); BPE over raw characters with `▁` for spaces (`"gemma4"`); and
//! WordPiece (`"bert"`). Encoding first cuts special tokens out of the text ([`special`]), then
//! hands each remaining fragment to the model ([`bpe`], [`spm`] or [`wpm`]). Token ids are
//! identical to the reference implementation's for the same GGUF file, including its rules for
//! which tokens are special, which end generation, and how tokens render back to bytes. A model
//! or pre-tokenizer not listed here is an error naming it, never a fallback.
//!
//! A [`Tokenizer`] is immutable and cheap to clone (the vocabulary is shared).

mod bpe;
mod decoder;
mod pretokenize;
mod special;
mod spm;
mod unicode;
mod vocab;
mod wpm;

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

use bpe::{BpeOptions, Spelling};
pub use decoder::StreamDecoder;
use pretokenize::PreTokenizer;
use special::{Fragment, Special, SpecialTokens};
use vocab::{attr, Vocab};

const KEY_NAME: &str = "general.name";
const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_EOT: &str = "tokenizer.ggml.eot_token_id";
const KEY_EOM: &str = "tokenizer.ggml.eom_token_id";
const KEY_FIM_PRE: [&str; 2] = [
    "tokenizer.ggml.fim_pre_token_id",
    "tokenizer.ggml.prefix_token_id",
];
const KEY_FIM_SUF: [&str; 2] = [
    "tokenizer.ggml.fim_suf_token_id",
    "tokenizer.ggml.suffix_token_id",
];
const KEY_FIM_MID: [&str; 2] = [
    "tokenizer.ggml.fim_mid_token_id",
    "tokenizer.ggml.middle_token_id",
];
const KEY_FIM_PAD: &str = "tokenizer.ggml.fim_pad_token_id";
const KEY_FIM_REP: &str = "tokenizer.ggml.fim_rep_token_id";
const KEY_FIM_SEP: &str = "tokenizer.ggml.fim_sep_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const KEY_UNKNOWN: &str = "tokenizer.ggml.unknown_token_id";
// Sic: the key is spelled this way.
const KEY_SEPARATOR: &str = "tokenizer.ggml.seperator_token_id";
const KEY_LOWERCASE: &str = "tokenizer.ggml.normalizer.lowercase";
const KEY_STRIP_ACCENTS: &str = "tokenizer.ggml.normalizer.strip_accents";

/// BERT's `[UNK]` and `[SEP]`, for WordPiece files that name none.
const WPM_UNKNOWN: u32 = 100;
const WPM_SEPARATOR: u32 = 102;

/// Texts that mark a token as end-of-turn when the file names none.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

/// Texts of tokens that end generation, whatever their declared type.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Tokens some chat formats print verbatim although their vocabularies mark them as control.
const ALWAYS_RENDERED_TEXTS: &[&str] =
    &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// A tokenizer model (`tokenizer.ggml.model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `gpt2`: byte-level BPE.
    Bpe,
    /// `llama`: SentencePiece-style BPE with byte fallback.
    Spm,
    /// `gemma4`: BPE over raw characters, spaces written as `▁`.
    Gemma4,
    /// `bert`: WordPiece.
    Wpm,
}

impl Kind {
    fn of(name: &str) -> Result<Self> {
        Ok(match name {
            "gpt2" => Kind::Bpe,
            "llama" => Kind::Spm,
            "gemma4" => Kind::Gemma4,
            "bert" => Kind::Wpm,
            other => {
                return Err(Error::Unsupported(format!(
                    "tokenizer model `{other}` (supported: gpt2, llama, gemma4, bert)"
                )))
            }
        })
    }

    /// The BOS and EOS ids a file of this model gets unless it names its own.
    fn default_bos_eos(self) -> (Option<u32>, Option<u32>) {
        match self {
            Kind::Bpe => (Some(11), Some(11)),
            Kind::Spm => (Some(1), Some(2)),
            Kind::Gemma4 => (None, None),
            // BERT's [CLS] opens a sequence; [SEP] closes it and there is no EOS.
            Kind::Wpm => (Some(101), None),
        }
    }
}

#[derive(Debug)]
enum Model {
    /// BPE over pre-tokenized words (`gpt2`, `gemma4`).
    Bpe(bpe::Bpe),
    /// SentencePiece-style BPE with byte fallback.
    Spm,
    /// WordPiece.
    Wpm(wpm::WpmOptions),
}

struct Inner {
    vocab: Vocab,
    model: Model,
    specials: SpecialTokens,
    bos: Option<u32>,
    eos: Option<u32>,
    /// The token that closes a sequence after its text (WordPiece's `[SEP]`).
    sep: Option<u32>,
    /// Sorted ids of the end-of-generation tokens.
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    /// Spaces are written as `▁` in token texts (SentencePiece-style vocabularies).
    escaped_spaces: bool,
    /// Remove spaces before punctuation when decoding (set per model and pre-tokenizer).
    clean_spaces: bool,
}

/// A tokenizer loaded from a GGUF file's `tokenizer.ggml.*` metadata.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("Tokenizer")
            .field(
                "model",
                &match i.model {
                    Model::Bpe(_) => "bpe",
                    Model::Spm => "spm",
                    Model::Wpm(_) => "wpm",
                },
            )
            .field("vocab_size", &i.vocab.len())
            .field("bos", &i.bos)
            .field("eos", &i.eos)
            .field("eog", &i.eog)
            .field("add_bos", &i.add_bos)
            .field("add_eos", &i.add_eos)
            .field("add_space_prefix", &i.add_space_prefix)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let kind = Kind::of(file.get_str(KEY_MODEL)?)?;

        let mut vocab = load_vocab(file)?;
        let n_tokens = vocab.len();

        let in_range = |id: u32| (id as usize) < n_tokens;
        let key_id = |key: &str| -> Result<Option<u32>> {
            let Some(value) = file.get(key) else {
                return Ok(None);
            };
            let id = value.as_i64().ok_or_else(|| Error::Metadata {
                key: key.to_string(),
                problem: "expected an integer token id".to_string(),
            })?;
            // An id outside the vocabulary is ignored, keeping the default.
            Ok(u32::try_from(id).ok().filter(|&id| in_range(id)))
        };
        let keys_id = |keys: &[&str]| -> Result<Option<u32>> {
            let mut found = None;
            for key in keys {
                found = key_id(key)?.or(found);
            }
            Ok(found)
        };

        let flag = |key: &str, default: bool| -> Result<bool> {
            match file.get(key) {
                None => Ok(default),
                Some(_) => file.get_bool(key),
            }
        };

        // What the model (and for byte-level BPE, the pre-tokenizer) implies, before the
        // file's own flags.
        let mut add_bos_default = matches!(kind, Kind::Spm | Kind::Wpm | Kind::Gemma4);
        let (model, clean_spaces) = match kind {
            Kind::Spm => {
                vocab.resolve_byte_tokens();
                (Model::Spm, false)
            }
            Kind::Bpe => {
                let pre = match file.get(KEY_PRE) {
                    Some(value) => value.as_str().ok_or_else(|| Error::Metadata {
                        key: KEY_PRE.to_string(),
                        problem: "expected a string".to_string(),
                    })?,
                    None => {
                        return Err(Error::Unsupported(format!(
                            "a BPE vocabulary without a pre-tokenizer ({KEY_PRE})"
                        )))
                    }
                };
                let spec = bpe_pre_tokenizer(pre)?;
                add_bos_default = spec.add_bos;
                let merges = file.get_str_array(KEY_MERGES)?;
                let options = BpeOptions {
                    pre: spec.pre,
                    spelling: Spelling::ByteLevel,
                    ignore_merges: spec.ignore_merges,
                    whole_newlines: false,
                };
                (
                    Model::Bpe(bpe::Bpe::new(&merges, options)),
                    spec.clean_spaces,
                )
            }
            Kind::Gemma4 => {
                let merges = file.get_str_array(KEY_MERGES)?;
                let options = BpeOptions {
                    pre: PreTokenizer::Newlines,
                    spelling: Spelling::Raw,
                    ignore_merges: false,
                    whole_newlines: true,
                };
                (Model::Bpe(bpe::Bpe::new(&merges, options)), true)
            }
            Kind::Wpm => {
                let lowercase = flag(KEY_LOWERCASE, true)?;
                let unknown = key_id(KEY_UNKNOWN)?
                    .or(Some(WPM_UNKNOWN).filter(|&id| in_range(id)))
                    .ok_or_else(|| {
                        Error::Tokenizer(
                            "the WordPiece vocabulary names no unknown token".to_string(),
                        )
                    })?;
                let options = wpm::WpmOptions {
                    lowercase,
                    strip_accents: flag(KEY_STRIP_ACCENTS, lowercase)?,
                    unknown,
                };
                (Model::Wpm(options), true)
            }
        };

        // Defaults that the file's keys override.
        let (default_bos, default_eos) = kind.default_bos_eos();

        let bos = key_id(KEY_BOS)?.or(default_bos.filter(|&id| in_range(id)));
        let eos = key_id(KEY_EOS)?.or(default_eos.filter(|&id| in_range(id)));
        let eot = key_id(KEY_EOT)?;
        let eom = key_id(KEY_EOM)?;
        let fim_pre = keys_id(&KEY_FIM_PRE)?;
        let fim_suf = keys_id(&KEY_FIM_SUF)?;
        let fim_mid = keys_id(&KEY_FIM_MID)?;
        let fim_pad = key_id(KEY_FIM_PAD)?;
        let fim_rep = key_id(KEY_FIM_REP)?;
        let fim_sep = key_id(KEY_FIM_SEP)?;

        let sep = match kind {
            Kind::Wpm => Some(
                key_id(KEY_SEPARATOR)?
                    .or(Some(WPM_SEPARATOR).filter(|&id| in_range(id)))
                    .ok_or_else(|| {
                        Error::Tokenizer(
                            "the WordPiece vocabulary names no separator token".to_string(),
                        )
                    })?,
            ),
            Kind::Bpe | Kind::Spm | Kind::Gemma4 => None,
        };

        // WordPiece always opens a sequence with [CLS]; Gemma 4 always with BOS whatever its
        // file says, as the reference does.
        let add_bos = match kind {
            Kind::Wpm | Kind::Gemma4 => true,
            Kind::Bpe | Kind::Spm => flag(KEY_ADD_BOS, add_bos_default)?,
        };
        let add_eos = kind != Kind::Wpm && flag(KEY_ADD_EOS, false)?;
        let add_space_prefix = flag(KEY_ADD_SPACE_PREFIX, kind == Kind::Spm)?;
        let escaped_spaces = matches!(kind, Kind::Spm | Kind::Gemma4 | Kind::Wpm);

        let eog = end_of_generation(
            &mut vocab,
            Roles {
                eos,
                eot,
                eom,
                fim_pre,
                fim_suf,
                fim_mid,
                fim_pad,
                fim_rep,
                fim_sep,
            },
        );

        // The reference strips the whitespace after Phi-3's special tokens (all but the three
        // below), recognizing Phi-3 by the model's name.
        let name = file
            .get(KEY_NAME)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_lowercase();
        let phi3 = name.contains("phi-3") || name.contains("phi3");
        let specials = SpecialTokens::new(
            (0..n_tokens)
                .filter_map(|i| {
                    let a = vocab.attrs[i];
                    (a & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0).then(|| {
                        let id = i as u32;
                        let text = vocab.text(id).unwrap_or_default().to_string();
                        Special {
                            id,
                            always: a & (attr::CONTROL | attr::UNKNOWN) == 0,
                            rstrip: phi3
                                && !["<unk>", "<s>", "<|endoftext|>"].contains(&text.as_str()),
                            text,
                        }
                    })
                })
                .collect(),
        );

        if add_bos && bos.is_none() {
            return Err(Error::Tokenizer(
                "the model asks for a BOS token but names none".to_string(),
            ));
        }
        if add_eos && eos.is_none() {
            return Err(Error::Tokenizer(
                "the model asks for an EOS token but names none".to_string(),
            ));
        }

        Ok(Self {
            inner: Arc::new(Inner {
                vocab,
                model,
                specials,
                bos,
                eos,
                sep,
                eog,
                add_bos,
                add_eos,
                add_space_prefix,
                escaped_spaces,
                clean_spaces,
            }),
        })
    }

    /// Token ids of `text`.
    ///
    /// `add_special` prepends BOS when the model's `add_bos_token` says so (and appends EOS if
    /// `add_eos_token` does; WordPiece appends its separator). With `parse_special`, special
    /// tokens written in the text (control and user-defined, e.g. `<|im_start|>`, `<bos>`)
    /// become their ids; without it only user-defined tokens do, and control-token text is
    /// tokenized as plain text.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let i = &*self.inner;
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && i.add_bos {
            out.extend(i.bos);
        }

        let fragments = i.specials.partition(text, parse_special);
        match &i.model {
            Model::Bpe(bpe) => {
                let mut escaped = String::new();
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(range) if i.escaped_spaces => {
                            escaped.clear();
                            spm::push_escaped(&mut escaped, &text[range]);
                            bpe.encode(&i.vocab, &escaped, &mut out);
                        }
                        Fragment::Text(range) => bpe.encode(&i.vocab, &text[range], &mut out),
                    }
                }
            }
            Model::Wpm(options) => {
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(range) => {
                            wpm::encode(&i.vocab, *options, &text[range], &mut out)
                        }
                    }
                }
            }
            Model::Spm => {
                let mut escaped = String::new();
                // A fragment at the start or after a special token gets the space prefix.
                let mut after_special = true;
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                        Fragment::Text(range) => {
                            escaped.clear();
                            if i.add_space_prefix && after_special {
                                escaped.push(spm::SPACE_MARK);
                            }
                            spm::push_escaped(&mut escaped, &text[range]);
                            spm::encode(&i.vocab, &escaped, &mut out)?;
                            after_special = false;
                        }
                    }
                }
            }
        }

        if add_special && i.add_eos {
            out.extend(i.eos);
        }
        if add_special {
            out.extend(i.sep);
        }
        Ok(out)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.vocab.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.inner.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.inner.eos
    }

    /// Whether `encode(.., add_special = true, ..)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.inner.add_bos
    }

    /// True for tokens that end generation: EOS, EOT, EOM, and tokens recognized by their text
    /// such as `<|im_end|>`, `<end_of_turn>` and `<|endoftext|>`.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.inner.eog.binary_search(&id).is_ok()
    }

    /// The ids of all end-of-generation tokens, ascending.
    pub fn end_of_generation_ids(&self) -> &[u32] {
        &self.inner.eog
    }

    /// The token whose text is exactly `text` (as stored in the vocabulary: `▁` for spaces in
    /// SentencePiece vocabularies, the byte-level alphabet in BPE ones).
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.inner.vocab.id(text)
    }

    /// A token's text as stored in the vocabulary (e.g. `<bos>`, `<|im_end|>`, `▁Paris`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.inner.vocab.text(id)
    }

    /// The bytes a token contributes to output text: byte-level BPE decoded, `<0xNN>` tokens as
    /// their byte, `▁` as a space. Control and unknown tokens contribute nothing unless
    /// `render_special`, then their text; user-defined tokens always contribute their text.
    pub fn token_bytes(&self, id: u32, render_special: bool) -> Result<Vec<u8>> {
        let i = &*self.inner;
        let text = i.vocab.text(id).ok_or_else(|| {
            Error::Tokenizer(format!(
                "token id {id} is outside the vocabulary of {} tokens",
                i.vocab.len()
            ))
        })?;
        let a = i.vocab.attr(id);
        let special = attr::UNKNOWN | attr::CONTROL;
        if a & special != 0 && !render_special {
            return Ok(Vec::new());
        }
        if a & (special | attr::USER_DEFINED) != 0 {
            return Ok(text.as_bytes().to_vec());
        }
        if a & attr::NORMAL != 0 {
            return Ok(if i.escaped_spaces {
                text.replace(spm::SPACE_MARK, " ").into_bytes()
            } else {
                decode_byte_level(text)
            });
        }
        if a & attr::BYTE != 0 {
            return byte_token_value(text).map(|b| vec![b]).ok_or_else(|| {
                Error::Tokenizer(format!("byte token {id} has malformed text {text:?}"))
            });
        }
        // Unused and undefined tokens render as nothing.
        Ok(Vec::new())
    }

    /// The text of a token sequence. Control tokens (BOS, EOS, turn markers) contribute nothing.
    /// When the model adds a space prefix, the first token's leading space is dropped, as the
    /// encoder added it; the vocabularies that ask for it also get spaces before punctuation
    /// removed. Invalid UTF-8 becomes U+FFFD, decided only on the whole text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// [`decode`](Self::decode), with control and unknown tokens rendered as their text when
    /// `render_special`.
    pub fn decode_with(&self, ids: &[u32], render_special: bool) -> Result<String> {
        let i = &*self.inner;
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for (n, &id) in ids.iter().enumerate() {
            let piece = self.token_bytes(id, render_special)?;
            let piece = match piece.split_first() {
                Some((b' ', rest)) if n == 0 && i.add_space_prefix => rest,
                _ => &piece[..],
            };
            bytes.extend_from_slice(piece);
        }
        if i.clean_spaces {
            decoder::clean_spaces(&mut bytes);
        }
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// A decoder for streaming generated tokens as text.
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder::new()
    }
}

/// Token roles named by the file (`None` where it names none).
struct Roles {
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    fim_pre: Option<u32>,
    fim_suf: Option<u32>,
    fim_mid: Option<u32>,
    fim_pad: Option<u32>,
    fim_rep: Option<u32>,
    fim_sep: Option<u32>,
}

/// The sorted ids of the tokens that end generation. Roles the file leaves unnamed are
/// recognized by token text, and tokens recognized that way become control tokens (so they are
/// parsed as special and not rendered), as the reference does; where several tokens match one
/// role, the lowest id takes it.
fn end_of_generation(vocab: &mut Vocab, roles: Roles) -> Vec<u32> {
    let Roles {
        eos,
        mut eot,
        mut eom,
        mut fim_pre,
        mut fim_suf,
        mut fim_mid,
        mut fim_pad,
        mut fim_rep,
        mut fim_sep,
    } = roles;
    for (slot, texts) in [
        (&mut eot, EOT_TEXTS),
        (&mut eom, EOM_TEXTS),
        (&mut fim_pre, FIM_PRE_TEXTS),
        (&mut fim_suf, FIM_SUF_TEXTS),
        (&mut fim_mid, FIM_MID_TEXTS),
        (&mut fim_pad, FIM_PAD_TEXTS),
        (&mut fim_rep, FIM_REP_TEXTS),
        (&mut fim_sep, FIM_SEP_TEXTS),
    ] {
        if slot.is_none() {
            *slot = vocab.find_any(texts);
            if let Some(id) = *slot {
                vocab.attrs[id as usize] |= attr::CONTROL;
            }
        }
    }

    let mut eog: Vec<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
    for text in EOG_TEXTS {
        if let Some(id) = vocab.id(text) {
            eog.push(id);
            vocab.attrs[id as usize] |= attr::CONTROL;
        }
    }
    for text in ALWAYS_RENDERED_TEXTS {
        if let Some(id) = vocab.id(text) {
            vocab.attrs[id as usize] = attr::USER_DEFINED;
        }
    }
    eog.extend([eos, eot, eom].into_iter().flatten());
    eog.sort_unstable();
    eog.dedup();

    // Vocabularies with explicit return/call tokens use `<|end|>` between messages, not at
    // the end of generation.
    let eog_has =
        |eog: &[u32], vocab: &Vocab, text: &str| vocab.id(text).is_some_and(|id| eog.contains(&id));
    if let Some(end) = vocab.id("<|end|>").filter(|id| eog.contains(id)) {
        let calls = eog_has(&eog, vocab, "<|call|>") || eog_has(&eog, vocab, "<|calls|>");
        let ends = eog_has(&eog, vocab, "<|return|>") || eog_has(&eog, vocab, "<|flush|>");
        if calls && ends {
            eog.retain(|&id| id != end);
            vocab.attrs[end as usize] = attr::USER_DEFINED;
        }
    }
    // Vocabularies with their own end-of-turn markers use `</s>` as ordinary text.
    if let Some(s) = vocab.id("</s>").filter(|id| eog.contains(id)) {
        if eog_has(&eog, vocab, "<|tool_response>") || eog_has(&eog, vocab, "<|plamo:eos|>") {
            eog.retain(|&id| id != s);
            vocab.attrs[s as usize] = attr::NORMAL;
        }
    }

    eog
}

/// Reads token texts, scores and types.
fn load_vocab(file: &GgufFile) -> Result<Vocab> {
    let tokens = file.get_str_array(KEY_TOKENS)?;
    let n = tokens.len();
    let scores = match file.get(KEY_SCORES) {
        Some(_) => file.get_f32_array(KEY_SCORES)?,
        None => vec![0.0; n],
    };
    let attrs: Vec<u16> = match file.get(KEY_TOKEN_TYPE) {
        Some(_) => file
            .get_i64_array(KEY_TOKEN_TYPE)?
            .into_iter()
            .map(attr::from_gguf_type)
            .collect(),
        None => vec![attr::NORMAL; n],
    };
    for (key, len) in [(KEY_SCORES, scores.len()), (KEY_TOKEN_TYPE, attrs.len())] {
        if len < n {
            return Err(Error::Metadata {
                key: key.to_string(),
                problem: format!("{len} entries for {n} tokens"),
            });
        }
    }

    Vocab::new(&tokens, scores, attrs)
}

/// What a byte-level BPE vocabulary's pre-tokenizer name implies.
#[derive(Debug, Clone, Copy)]
struct PreSpec {
    pre: PreTokenizer,
    /// Decoding removes spaces before punctuation.
    clean_spaces: bool,
    /// A word that is a token as a whole skips merging.
    ignore_merges: bool,
    /// BOS is added unless the file says otherwise.
    add_bos: bool,
}

impl PreSpec {
    const fn new(pre: PreTokenizer, clean_spaces: bool) -> Self {
        Self {
            pre,
            clean_spaces,
            ignore_merges: false,
            add_bos: false,
        }
    }
}

/// The pre-tokenizer names this crate implements, with what each implies, as the reference
/// defines them.
const BPE_PRE_TOKENIZERS: &[(&[&str], PreSpec)] = &[
    (
        &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ],
        PreSpec {
            pre: PreTokenizer::Llama3,
            clean_spaces: true,
            ignore_merges: true,
            add_bos: true,
        },
    ),
    (
        &["dbrx", "smaug-bpe"],
        PreSpec::new(PreTokenizer::Llama3, true),
    ),
    (
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "hunyuan",
            "solar-open",
            "grok-2",
        ],
        PreSpec::new(PreTokenizer::Qwen2, false),
    ),
    (
        &["stablelm2", "megrez"],
        PreSpec::new(PreTokenizer::Qwen2, true),
    ),
    (&["qwen35"], PreSpec::new(PreTokenizer::Qwen35, false)),
    (
        &["deepseek-llm"],
        PreSpec::new(PreTokenizer::DeepseekLlm, false),
    ),
    (
        &["deepseek-coder"],
        PreSpec::new(PreTokenizer::DeepseekCoder, false),
    ),
    (&["falcon"], PreSpec::new(PreTokenizer::Falcon, true)),
    (
        &[
            "gpt-2", "phi-2", "mpt", "olmo", "jais", "gigachat", "a.x-4.0", "mellum", "exaone4",
        ],
        PreSpec::new(PreTokenizer::Gpt2, true),
    ),
    (
        &["trillion", "granite-docling"],
        PreSpec::new(PreTokenizer::Gpt2, false),
    ),
    (
        &[
            "starcoder",
            "refact",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        PreSpec::new(PreTokenizer::IsolatedDigitsGpt2, true),
    ),
    (
        &["smollm", "command-r"],
        PreSpec::new(PreTokenizer::IsolatedDigitsGpt2, false),
    ),
];

/// The pre-tokenizer of a byte-level BPE vocabulary, by its `tokenizer.ggml.pre` name.
fn bpe_pre_tokenizer(name: &str) -> Result<PreSpec> {
    BPE_PRE_TOKENIZERS
        .iter()
        .find(|(names, _)| names.contains(&name))
        .map(|&(_, spec)| spec)
        .ok_or_else(|| {
            let supported: Vec<&str> = BPE_PRE_TOKENIZERS
                .iter()
                .flat_map(|(names, _)| names.iter().copied())
                .collect();
            Error::Unsupported(format!(
                "BPE pre-tokenizer `{name}` (supported: {})",
                supported.join(", ")
            ))
        })
}

/// Decodes a token spelled in the byte-level alphabet. A character outside the alphabet (which
/// a well-formed vocabulary never has) is kept visible as `[UNK_BYTE_0x..]`.
fn decode_byte_level(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match bpe::char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(b"[UNK_BYTE_0x");
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

/// The byte of a `<0xNN>` token.
fn byte_token_value(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizers_are_shareable_across_threads() {
        fn shareable<T: Clone + Send + Sync + fmt::Debug>() {}
        shareable::<Tokenizer>();
        shareable::<StreamDecoder>();
    }

    #[test]
    fn unsupported_models_and_pre_tokenizers_are_named() {
        let e = Kind::of("t5").expect_err("t5 is not supported");
        assert!(e.to_string().contains("`t5`"), "{e}");
        for name in [
            "llama-bpe",
            "qwen35",
            "deepseek-llm",
            "falcon",
            "smollm",
            "gpt-2",
        ] {
            assert!(bpe_pre_tokenizer(name).is_ok(), "{name}");
        }
        let e = bpe_pre_tokenizer("chameleon").expect_err("chameleon is not supported");
        assert!(e.to_string().contains("`chameleon`"), "{e}");
        assert!(e.to_string().contains("llama-bpe"), "{e}");
        // Every name appears once.
        let mut names: Vec<&str> = BPE_PRE_TOKENIZERS
            .iter()
            .flat_map(|(names, _)| names.iter().copied())
            .collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(byte_token_value("<0x0A>"), Some(b'\n'));
        assert_eq!(byte_token_value("<0xff>"), Some(0xFF));
        assert_eq!(byte_token_value("<0x1>"), None);
        assert_eq!(byte_token_value("0x41"), None);
    }

    #[test]
    fn byte_level_text_decodes() {
        assert_eq!(decode_byte_level("ĠHello"), b" Hello");
        assert_eq!(decode_byte_level("Ċ"), b"\n");
        // "é" is two bytes, spelled as two characters of the alphabet.
        let spelled: String = "é".bytes().map(bpe::byte_to_char).collect();
        assert_eq!(decode_byte_level(&spelled), "é".as_bytes());
        assert_eq!(decode_byte_level("日"), b"[UNK_BYTE_0xe697a5\xe6\x97\xa5]");
    }
}

/// One symbol of a word being merged (by BPE ranks or SentencePiece scores): a byte range of
/// the spelled word, linked to its live neighbours. A symbol merged into its left neighbour has
/// `len == 0`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Symbol {
    pub start: usize,
    pub len: usize,
    pub prev: Option<usize>,
    pub next: Option<usize>,
}
