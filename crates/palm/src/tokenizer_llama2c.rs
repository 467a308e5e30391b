//! SentencePiece-style scored-BPE tokenizers: llama2.c's `tokenizer.bin` files (`tok512.bin`) and
//! GGUF `tokenizer.ggml.model = llama` vocabularies (built in `tokenizer_gguf`).
//!
//! llama2.c file format (little-endian): i32 max_token_length, then per token: f32 score, i32
//! len, `len` bytes of the piece. Ids 0, 1, 2 are `<unk>`, BOS, EOS; 3..=258 are the byte
//! fallbacks `<0xNN>`.
//!
//! Encoding (llama2.c's `encode()` and llama.cpp's SentencePiece session alike): one symbol per
//! UTF-8 character (its byte-fallback ids when the character is not a piece), then repeatedly
//! merge the adjacent pair whose concatenation is a piece with the highest score (the leftmost
//! pair on ties), until no pair merges. The pairs wait in a priority queue over a linked list
//! of symbols (as llama.cpp does), so a text of n characters costs O(n log n) instead of the
//! O(n²) of rescanning every pair after each merge.
//!
//! Spaces ([`SpaceStyle`]): llama2.c files hold real spaces in their pieces and add a
//! dummy-prefix space before non-empty text; GGUF/SentencePiece vocabularies write a space as
//! `▁` (U+2581), so text spaces are escaped to it and, with `add_space_prefix`, each text
//! fragment at the start or after a special token gets one `▁` in front.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const UNK: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
/// In llama2.c files byte b is id b + 3.
const BYTE_OFFSET: u32 = 3;
/// SentencePiece's visible space.
const SPM_SPACE: &str = "\u{2581}";

/// What a piece is (GGUF `tokenizer.ggml.token_type` 1..=6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    /// `<unk>`: dropped when decoding.
    Unknown,
    /// BOS, EOS and other control tokens: matched in text (SentencePiece style only), dropped
    /// when decoding.
    Control,
    /// Matched in text as one id (SentencePiece style only); decoded as its text.
    UserDefined,
    /// Never produced by encoding; dropped when decoding.
    Unused,
    /// A byte fallback `<0xNN>`: decoded as the raw byte.
    Byte(u8),
}

/// How spaces appear in the pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpaceStyle {
    /// llama2.c: pieces hold real spaces; a dummy-prefix `" "` starts non-empty text (when
    /// `" "` is a piece); decoding strips the leading space of the piece right after BOS.
    Llama2c,
    /// SentencePiece/GGUF: spaces are `▁` in pieces and text spaces are escaped to it; with
    /// `add_space_prefix` a `▁` goes before the text at the start and after each special
    /// token, and decoding drops one leading space of the output.
    SentencePiece { add_space_prefix: bool },
}

/// Everything a [`SpmTokenizer`] is made of.
#[derive(Debug, Clone)]
pub struct SpmVocab {
    /// Piece bytes, in id order.
    pub pieces: Vec<Vec<u8>>,
    pub scores: Vec<f32>,
    pub kinds: Vec<PieceKind>,
    pub unk: Option<u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// `encode_prompt` adds BOS / EOS.
    pub add_bos: bool,
    pub add_eos: bool,
    pub space: SpaceStyle,
}

/// A scored-BPE (SentencePiece-style) tokenizer.
#[derive(Debug, Clone)]
pub struct SpmTokenizer {
    pub pieces: Vec<Vec<u8>>,
    pub scores: Vec<f32>,
    pub kinds: Vec<PieceKind>,
    pub max_token_length: usize,
    pub unk: Option<u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub space: SpaceStyle,
    /// Ids that end a generation (EOS first); see `crate::tokenizer::Tokenizer::add_end_ids`.
    pub end_ids: Vec<u32>,
    /// The file the vocabulary came from (for messages).
    pub path: PathBuf,
    /// Pieces that encoding may produce by merging (normal, user-defined, unknown).
    merge_lookup: HashMap<Vec<u8>, u32>,
    /// Every piece, first id wins.
    all_lookup: HashMap<Vec<u8>, u32>,
    byte_ids: [Option<u32>; 256],
    /// Control and user-defined pieces matched in text (SentencePiece style), by first byte,
    /// longest first.
    specials: HashMap<u8, Vec<(Vec<u8>, u32)>>,
}

/// Old name: llama2.c files are one source of these tokenizers.
pub type Llama2cTokenizer = SpmTokenizer;

/// An f32 score with a total order, for the merge queue.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Score(f32);
impl Eq for Score {}
impl PartialOrd for Score {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Score {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0)
    }
}

const NONE: usize = usize::MAX;

/// One symbol of the text being merged: a byte span, or a fixed (byte-fallback/unk) id.
#[derive(Debug, Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
    fixed: Option<u32>,
}

impl SpmTokenizer {
    /// Reads a llama2.c tokenizer file; truncated or malformed files are refused with the path
    /// and the token index where reading failed.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |i: usize, what: &str| {
            Error::Tokenizer(format!(
                "{}: not a llama2.c tokenizer: {what} at token {i}",
                path.display()
            ))
        };
        let mut o = 0usize;
        let read4 = |o: &mut usize, i: usize| -> Result<[u8; 4]> {
            let b: [u8; 4] = bytes
                .get(*o..*o + 4)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| bad(i, "file ends early"))?;
            *o += 4;
            Ok(b)
        };
        let max_len = i32::from_le_bytes(read4(&mut o, 0)?);
        if max_len <= 0 {
            return Err(bad(0, "non-positive max_token_length"));
        }
        let (mut pieces, mut scores) = (Vec::new(), Vec::new());
        while o < bytes.len() {
            let i = pieces.len();
            let score = f32::from_le_bytes(read4(&mut o, i)?);
            let len = i32::from_le_bytes(read4(&mut o, i)?);
            if len < 0 || o + len as usize > bytes.len() {
                return Err(bad(i, &format!("piece length {len} runs past the end")));
            }
            pieces.push(bytes[o..o + len as usize].to_vec());
            scores.push(score);
            o += len as usize;
        }
        if pieces.len() < (BYTE_OFFSET + 256) as usize {
            return Err(bad(
                pieces.len(),
                "fewer than 259 tokens (no byte fallbacks)",
            ));
        }
        let kinds = (0..pieces.len() as u32)
            .map(|i| match i {
                UNK => PieceKind::Unknown,
                BOS | EOS => PieceKind::Control,
                i if i < BYTE_OFFSET + 256 => PieceKind::Byte((i - BYTE_OFFSET) as u8),
                _ => PieceKind::Normal,
            })
            .collect();
        let mut t = Self::from_vocab(
            SpmVocab {
                pieces,
                scores,
                kinds,
                unk: Some(UNK),
                bos: Some(BOS),
                eos: Some(EOS),
                add_bos: true,
                add_eos: false,
                space: SpaceStyle::Llama2c,
            },
            path,
        )?;
        t.max_token_length = t.max_token_length.max(max_len as usize);
        Ok(t)
    }

    /// Builds a tokenizer from pieces, scores and kinds. Refused (naming `path`): lists of
    /// different lengths, special ids outside the vocabulary, and a vocabulary that can encode
    /// neither some byte (no `<0xNN>` piece) nor an unknown character (no `unk`).
    pub fn from_vocab(v: SpmVocab, path: &Path) -> Result<Self> {
        let n = v.pieces.len();
        let bad = |m: String| Error::Tokenizer(format!("{}: {m}", path.display()));
        if v.scores.len() != n || v.kinds.len() != n {
            return Err(bad(format!(
                "{n} pieces but {} scores and {} token types",
                v.scores.len(),
                v.kinds.len()
            )));
        }
        for (name, id) in [("unknown", v.unk), ("BOS", v.bos), ("EOS", v.eos)] {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return Err(bad(format!(
                    "{name} token id {id} is outside the vocabulary of {n}"
                )));
            }
        }
        let mut byte_ids = [None; 256];
        let mut merge_lookup = HashMap::with_capacity(n);
        let mut all_lookup = HashMap::with_capacity(n);
        let mut specials: HashMap<u8, Vec<(Vec<u8>, u32)>> = HashMap::new();
        let spm = matches!(v.space, SpaceStyle::SentencePiece { .. });
        for (i, (p, k)) in v.pieces.iter().zip(&v.kinds).enumerate() {
            let id = i as u32;
            all_lookup.entry(p.clone()).or_insert(id);
            match k {
                PieceKind::Byte(b) => {
                    byte_ids[*b as usize].get_or_insert(id);
                }
                PieceKind::Normal | PieceKind::Unknown => {
                    merge_lookup.entry(p.clone()).or_insert(id);
                }
                PieceKind::UserDefined => {
                    merge_lookup.entry(p.clone()).or_insert(id);
                    if spm && !p.is_empty() {
                        specials.entry(p[0]).or_default().push((p.clone(), id));
                    }
                }
                PieceKind::Control => {
                    if spm && !p.is_empty() {
                        specials.entry(p[0]).or_default().push((p.clone(), id));
                    }
                }
                PieceKind::Unused => {}
            }
        }
        for list in specials.values_mut() {
            list.sort_by_key(|(p, id)| (Reverse(p.len()), *id));
        }
        if v.unk.is_none() {
            if let Some(b) = byte_ids.iter().position(Option::is_none) {
                return Err(bad(format!(
                    "no byte-fallback piece <0x{b:02X}> and no unknown token: some text could not be encoded"
                )));
            }
        }
        Ok(Self {
            max_token_length: v.pieces.iter().map(Vec::len).max().unwrap_or(0),
            end_ids: v.eos.into_iter().collect(),
            pieces: v.pieces,
            scores: v.scores,
            kinds: v.kinds,
            unk: v.unk,
            bos: v.bos,
            eos: v.eos,
            add_bos: v.add_bos,
            add_eos: v.add_eos,
            space: v.space,
            path: path.to_path_buf(),
            merge_lookup,
            all_lookup,
            byte_ids,
            specials,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The id of a piece given as written in the vocabulary (`▁the`, `<0x0A>`, `<s>`).
    pub fn token_to_id(&self, piece: &str) -> Option<u32> {
        self.all_lookup.get(piece.as_bytes()).copied()
    }

    /// The piece of an id as written in the vocabulary (lossy UTF-8).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.pieces
            .get(id as usize)
            .map(|p| String::from_utf8_lossy(p).into_owned())
    }

    /// The ids of `text`, with BOS in front and EOS behind when asked (and the vocabulary has
    /// them).
    pub fn encode_with(&self, text: &str, bos: bool, eos: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() + 3);
        if bos {
            ids.extend(self.bos);
        }
        match self.space {
            SpaceStyle::Llama2c => {
                // dummy prefix: sentencepiece adds a space before non-empty text
                let prefixed;
                let t = if !text.is_empty() && self.merge_lookup.contains_key(b" ".as_slice()) {
                    prefixed = format!(" {text}");
                    prefixed.as_str()
                } else {
                    text
                };
                self.merge_into(t, &mut ids);
            }
            SpaceStyle::SentencePiece { add_space_prefix } => {
                let mut prev_special = true;
                for frag in self.split_specials(text) {
                    match frag {
                        Fragment::Special(id) => {
                            ids.push(id);
                            prev_special = true;
                        }
                        Fragment::Text(s) => {
                            let mut t = String::with_capacity(s.len() + 3);
                            if add_space_prefix && prev_special {
                                t.push(' ');
                            }
                            t.push_str(s);
                            self.merge_into(&t.replace(' ', SPM_SPACE), &mut ids);
                            prev_special = false;
                        }
                    }
                }
            }
        }
        if eos {
            ids.extend(self.eos);
        }
        ids
    }

    /// Splits text at the control and user-defined pieces (longest match first).
    fn split_specials<'a>(&self, text: &'a str) -> Vec<Fragment<'a>> {
        let b = text.as_bytes();
        let mut out = Vec::new();
        let (mut i, mut start) = (0, 0);
        while i < b.len() {
            let hit = self.specials.get(&b[i]).and_then(|list| {
                list.iter()
                    .find(|(p, _)| b[i..].starts_with(p))
                    .map(|(p, id)| (p.len(), *id))
            });
            match hit {
                // pieces are whole UTF-8 strings, so i and i + len are char boundaries
                Some((len, id)) if text.is_char_boundary(i) && text.is_char_boundary(i + len) => {
                    if start < i {
                        out.push(Fragment::Text(&text[start..i]));
                    }
                    out.push(Fragment::Special(id));
                    i += len;
                    start = i;
                }
                _ => i += 1,
            }
        }
        if start < b.len() {
            out.push(Fragment::Text(&text[start..]));
        }
        out
    }

    /// Appends the ids of one text fragment: one symbol per character (byte fallbacks for
    /// characters that are not pieces), then the highest-scoring merges, leftmost on ties.
    fn merge_into(&self, text: &str, ids: &mut Vec<u32>) {
        let b = text.as_bytes();
        let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
        let mut push = |start: usize, len: usize, fixed: Option<u32>| {
            let i = syms.len();
            syms.push(Sym {
                start,
                len,
                prev: if i == 0 { NONE } else { i - 1 },
                next: i + 1,
                fixed,
            });
        };
        for (start, ch) in text.char_indices() {
            let s = &b[start..start + ch.len_utf8()];
            if self.merge_lookup.contains_key(s) {
                push(start, s.len(), None);
            } else if let Some(bytes) = s
                .iter()
                .map(|&x| self.byte_ids[x as usize])
                .collect::<Option<Vec<u32>>>()
            {
                for (k, id) in bytes.into_iter().enumerate() {
                    push(start + k, 1, Some(id));
                }
            } else {
                // a byte without a fallback piece: the whole character is unknown (`from_vocab`
                // refused vocabularies that have neither)
                push(start, s.len(), Some(self.unk.unwrap_or(0)));
            }
        }
        let Some(last) = syms.last_mut() else { return };
        last.next = NONE;
        // the candidate merges: (score, leftmost first, left, right, merged length)
        let mut queue = BinaryHeap::new();
        let try_pair = |q: &mut BinaryHeap<_>, syms: &[Sym], l: usize, r: usize| {
            if l == NONE || r == NONE || syms[l].fixed.is_some() || syms[r].fixed.is_some() {
                return;
            }
            let span = &b[syms[l].start..syms[r].start + syms[r].len];
            if let Some(&id) = self.merge_lookup.get(span) {
                q.push((
                    Score(self.scores[id as usize]),
                    Reverse(l),
                    l,
                    r,
                    span.len(),
                ));
            }
        };
        for i in 1..syms.len() {
            try_pair(&mut queue, &syms, i - 1, i);
        }
        while let Some((_, _, l, r, len)) = queue.pop() {
            // stale: one side merged away or grew since this pair was queued
            if syms[l].next != r || syms[l].len + syms[r].len != len {
                continue;
            }
            syms[l].len = len;
            syms[l].next = syms[r].next;
            if syms[r].next != NONE {
                let n = syms[r].next;
                syms[n].prev = l;
            }
            syms[r].len = 0;
            syms[r].next = NONE;
            try_pair(&mut queue, &syms, syms[l].prev, l);
            try_pair(&mut queue, &syms, l, syms[l].next);
        }
        // symbol 0 is the head: merges keep the left symbol
        let mut i = 0;
        while i != NONE {
            let s = syms[i];
            ids.push(match s.fixed {
                Some(id) => id,
                None => self.merge_lookup[&b[s.start..s.start + s.len]],
            });
            i = s.next;
        }
    }

    /// The bytes of ids: byte-fallback pieces are raw bytes; unknown, control and unused ids
    /// are dropped. llama2.c style strips the leading space of the piece right after BOS;
    /// SentencePiece style turns `▁` into spaces and, with `add_space_prefix`, drops one
    /// leading space of the output. Ids outside the vocabulary are refused.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut prev: Option<u32> = None;
        for &id in ids {
            let piece = self.pieces.get(id as usize).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "id {id} is outside the vocabulary of {} ({})",
                    self.pieces.len(),
                    self.path.display()
                ))
            })?;
            match self.kinds[id as usize] {
                PieceKind::Byte(b) => out.push(b),
                PieceKind::Unknown | PieceKind::Control | PieceKind::Unused => {}
                PieceKind::Normal | PieceKind::UserDefined => match self.space {
                    SpaceStyle::Llama2c => {
                        let strip =
                            prev.is_some() && prev == self.bos && piece.first() == Some(&b' ');
                        out.extend_from_slice(if strip { &piece[1..] } else { piece });
                    }
                    SpaceStyle::SentencePiece { .. } => {
                        out.extend_from_slice(&replace_bytes(piece, SPM_SPACE.as_bytes(), b" "))
                    }
                },
            }
            prev = Some(id);
        }
        if let SpaceStyle::SentencePiece {
            add_space_prefix: true,
        } = self.space
        {
            if out.first() == Some(&b' ') {
                out.remove(0);
            }
        }
        Ok(out)
    }
}

enum Fragment<'a> {
    Text(&'a str),
    Special(u32),
}

fn replace_bytes(s: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made vocabulary: specials, 256 byte fallbacks, then pieces with scores.
    fn tiny(path: &Path, extra: &[(&str, f32)]) -> Llama2cTokenizer {
        let mut b = Vec::new();
        b.extend(8i32.to_le_bytes());
        let mut push = |p: &[u8], s: f32| {
            b.extend(s.to_le_bytes());
            b.extend((p.len() as i32).to_le_bytes());
            b.extend(p);
        };
        push(b"<unk>", 0.0);
        push(b"\n<s>\n", 0.0);
        push(b"\n</s>\n", 0.0);
        for i in 0..256 {
            push(format!("<0x{i:02X}>").as_bytes(), 0.0);
        }
        for (p, s) in extra {
            push(p.as_bytes(), *s);
        }
        std::fs::write(path, b).unwrap();
        Llama2cTokenizer::from_file(path).unwrap()
    }

    /// llama2.c's `encode()` as it was written (quadratic rescans), the reference for the
    /// queue-based merge.
    fn encode_rescan(t: &SpmTokenizer, text: &str) -> Vec<u32> {
        let mut toks: Vec<u32> = Vec::new();
        if !text.is_empty() {
            if let Some(&sp) = t.merge_lookup.get(b" ".as_slice()) {
                toks.push(sp);
            }
        }
        let mut buf = [0u8; 4];
        for ch in text.chars() {
            let s = ch.encode_utf8(&mut buf).as_bytes();
            match t.merge_lookup.get(s) {
                Some(&id) => toks.push(id),
                None => toks.extend(s.iter().map(|&b| b as u32 + BYTE_OFFSET)),
            }
        }
        let mut pair = Vec::new();
        loop {
            let mut best: Option<(f32, usize, u32)> = None;
            for i in 0..toks.len().saturating_sub(1) {
                pair.clear();
                pair.extend_from_slice(&t.pieces[toks[i] as usize]);
                pair.extend_from_slice(&t.pieces[toks[i + 1] as usize]);
                if let Some(&id) = t.merge_lookup.get(&pair) {
                    let sc = t.scores[id as usize];
                    if best.is_none_or(|(b, _, _)| sc > b) {
                        best = Some((sc, i, id));
                    }
                }
            }
            let Some((_, i, id)) = best else { break };
            toks[i] = id;
            toks.remove(i + 1);
        }
        toks
    }

    #[test]
    fn merges_highest_score_first_and_falls_back_to_bytes() {
        let dir = tempfile::tempdir().unwrap();
        // ids: 259 ' ', 260 'a', 261 'b', 262 'ab' (-1), 263 ' a' (-2), 264 ' ab' (-3)
        let t = tiny(
            &dir.path().join("t.bin"),
            &[
                (" ", 0.0),
                ("a", 0.0),
                ("b", 0.0),
                ("ab", -1.0),
                (" a", -2.0),
                (" ab", -3.0),
            ],
        );
        // " ab": ' ' a b -> 'ab' scores -1 > ' a' -2 -> [' ', 'ab'] -> ' ab'
        assert_eq!(t.encode_with("ab", true, false), vec![BOS, 264]);
        // 'é' is not a piece: bytes C3 A9 -> ids 0xC3+3, 0xA9+3
        assert_eq!(
            t.encode_with("é", false, true),
            vec![259, 0xC3 + 3, 0xA9 + 3, EOS]
        );
        assert_eq!(
            t.decode_bytes(&[BOS, 264, 0xC3 + 3, 0xA9 + 3, EOS])
                .unwrap(),
            "abé".as_bytes()
        );
        assert!(t.decode_bytes(&[999]).is_err());
    }

    #[test]
    fn ties_merge_the_leftmost_pair() {
        let dir = tempfile::tempdir().unwrap();
        // 259 ' ', 260 'a', 261 'aa' (-1): " aaa" -> ' ' [aa] a (leftmost of the two equal pairs)
        let t = tiny(
            &dir.path().join("t.bin"),
            &[(" ", 0.0), ("a", 0.0), ("aa", -1.0)],
        );
        assert_eq!(t.encode_with("aaa", false, false), vec![259, 261, 260]);
        assert_eq!(t.encode_with("aaaa", false, false), vec![259, 261, 261]);
    }

    #[test]
    fn queue_merge_equals_rescan_on_real_text() {
        let Some(tok) =
            crate::fixtures::require(crate::fixtures::data_path("models/stories260K/tok512.bin"))
        else {
            return;
        };
        let Some(corpus) = crate::fixtures::require(crate::fixtures::data_path(
            "corpora/tinystories_train_head_cased.txt",
        )) else {
            return;
        };
        let t = SpmTokenizer::from_file(&tok).unwrap();
        let text = std::fs::read_to_string(corpus).unwrap();
        // 300 stories-sized chunks at char boundaries, plus odd inputs
        let chars: Vec<char> = text.chars().take(60_000).collect();
        let mut cases: Vec<String> = chars.chunks(200).map(|c| c.iter().collect()).collect();
        cases.extend(
            [
                "",
                " ",
                "  a  ",
                "naïve café — 😀 2026!",
                "\n\n\tx",
                "aaaaaaaaaaaa",
            ]
            .map(String::from),
        );
        for c in &cases {
            assert_eq!(
                t.encode_with(c, false, false),
                encode_rescan(&t, c),
                "{c:?}"
            );
        }
        // and one long text, which the rescan takes seconds for
        let long: String = chars[..3000].iter().collect();
        assert_eq!(t.encode_with(&long, false, false), encode_rescan(&t, &long));
        if std::env::var("PALM_TIME_SPM").is_ok() {
            for n in [5_000, 20_000] {
                let s: String = chars[..n].iter().collect();
                let t0 = std::time::Instant::now();
                let a = t.encode_with(&s, false, false);
                let t1 = std::time::Instant::now();
                let b = encode_rescan(&t, &s);
                let t2 = std::time::Instant::now();
                assert_eq!(a, b);
                eprintln!("{n} chars: queue {:?}, rescan {:?}", t1 - t0, t2 - t1);
            }
        }
    }

    #[test]
    fn truncated_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.bin");
        std::fs::write(&p, [7u8, 0, 0, 0, 0, 0]).unwrap();
        let e = Llama2cTokenizer::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("bad.bin") && e.contains("token 0"), "{e}");
    }
}
