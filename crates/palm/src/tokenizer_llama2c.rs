//! The llama2.c tokenizer (`tokenizer.bin`, `tok512.bin`): a sentencepiece BPE vocabulary with
//! scores, encoded exactly as llama2.c's `encode()` does.
//!
//! File format (little-endian): i32 max_token_length, then per token: f32 score, i32 len, `len`
//! bytes of the piece. Ids 0, 1, 2 are `<unk>`, BOS, EOS; 3..=258 are the byte fallbacks `<0xNN>`.
//!
//! Encoding: a dummy-prefix space, one id per UTF-8 character (its byte-fallback ids when the
//! character is not a piece), then repeatedly merge the adjacent pair whose concatenation is a
//! piece with the highest score (the first such pair on ties), until no pair merges.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const UNK: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
/// Byte b is id b + 3.
const BYTE_OFFSET: u32 = 3;

#[derive(Debug, Clone)]
pub struct Llama2cTokenizer {
    pub pieces: Vec<Vec<u8>>,
    pub scores: Vec<f32>,
    pub max_token_length: usize,
    lookup: HashMap<Vec<u8>, u32>,
    pub path: PathBuf,
}

impl Llama2cTokenizer {
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
        let mut lookup = HashMap::with_capacity(pieces.len());
        for (i, p) in pieces.iter().enumerate() {
            lookup.entry(p.clone()).or_insert(i as u32);
        }
        Ok(Self {
            pieces,
            scores,
            max_token_length: max_len as usize,
            lookup,
            path: path.to_path_buf(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// llama2.c's `encode(text, bos, eos)`.
    pub fn encode_with(&self, text: &str, bos: bool, eos: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() + 3);
        if bos {
            ids.push(BOS);
        }
        let mut toks: Vec<u32> = Vec::with_capacity(text.len() + 1);
        // 1. dummy prefix: sentencepiece adds a space before non-empty text
        if !text.is_empty() {
            if let Some(&sp) = self.lookup.get(b" ".as_slice()) {
                toks.push(sp);
            }
        }
        // 2. one id per character, byte fallback for characters that are not pieces
        let mut buf = [0u8; 4];
        for ch in text.chars() {
            let s = ch.encode_utf8(&mut buf).as_bytes();
            match self.lookup.get(s) {
                Some(&id) => toks.push(id),
                None => toks.extend(s.iter().map(|&b| b as u32 + BYTE_OFFSET)),
            }
        }
        // 3. greedy merges: the best-scoring adjacent pair whose concatenation is a piece
        let mut pair = Vec::with_capacity(2 * self.max_token_length);
        loop {
            let mut best: Option<(f32, usize, u32)> = None;
            for i in 0..toks.len().saturating_sub(1) {
                pair.clear();
                pair.extend_from_slice(&self.pieces[toks[i] as usize]);
                pair.extend_from_slice(&self.pieces[toks[i + 1] as usize]);
                if let Some(&id) = self.lookup.get(&pair) {
                    let sc = self.scores[id as usize];
                    if best.is_none_or(|(b, _, _)| sc > b) {
                        best = Some((sc, i, id));
                    }
                }
            }
            let Some((_, i, id)) = best else { break };
            toks[i] = id;
            toks.remove(i + 1);
        }
        ids.extend(toks);
        if eos {
            ids.push(EOS);
        }
        ids
    }

    /// The bytes of ids, as llama2.c's `decode`: `<0xNN>` pieces are raw bytes, the special ids
    /// (`<unk>`, BOS, EOS) are dropped, and the leading space of a piece right after BOS is
    /// stripped. Ids outside the vocabulary are refused.
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
            if id > EOS {
                if (BYTE_OFFSET..BYTE_OFFSET + 256).contains(&id) {
                    out.push((id - BYTE_OFFSET) as u8);
                } else if prev == Some(BOS) && piece.first() == Some(&b' ') {
                    out.extend_from_slice(&piece[1..]);
                } else {
                    out.extend_from_slice(piece);
                }
            }
            prev = Some(id);
        }
        Ok(out)
    }
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
    fn truncated_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.bin");
        std::fs::write(&p, [7u8, 0, 0, 0, 0, 0]).unwrap();
        let e = Llama2cTokenizer::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("bad.bin") && e.contains("token 0"), "{e}");
    }
}
