//! Stop strings, seen where tokens are chosen.
//!
//! A turn that ends on a stop string must end at the same token every time, and its reply may
//! only finish once that turn is saved. So the engine watches the generated text itself and
//! ends the turn at the token that completes a stop string, exactly as it ends one at an
//! end-of-generation token; the HTTP layer (`completion.rs`) cuts the text at the same place
//! with the same functions, and waits for the engine's end.

/// Removes and returns the longest whole-character prefix of `bytes`. Invalid sequences become
/// U+FFFD; an incomplete character at the end stays for the next token.
pub fn take_complete_utf8(bytes: &mut Vec<u8>) -> String {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(bytes) {
            Ok(text) => {
                out.push_str(text);
                bytes.clear();
                return out;
            }
            Err(error) => {
                let valid = error.valid_up_to();
                out.push_str(std::str::from_utf8(&bytes[..valid]).unwrap_or_default());
                match error.error_len() {
                    None => {
                        bytes.drain(..valid);
                        return out;
                    }
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        bytes.drain(..valid + bad);
                    }
                }
            }
        }
    }
}

/// The earliest stop string in `text`: its byte offset and the string.
pub fn find_stop(text: &str, stops: &[String]) -> Option<(usize, String)> {
    stops
        .iter()
        .filter_map(|stop| text.find(stop.as_str()).map(|at| (at, stop.clone())))
        .min_by_key(|(at, _)| *at)
}

/// Follows a turn's generated text and says at which token a stop string appeared.
#[derive(Debug, Default)]
pub struct StopScanner {
    stops: Vec<String>,
    /// Bytes of a character not yet whole.
    pending_bytes: Vec<u8>,
    /// The end of the text so far: enough to hold all of a stop string but its last byte.
    tail: String,
    longest: usize,
}

impl StopScanner {
    pub fn new(stops: &[String]) -> Self {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            stops,
            pending_bytes: Vec::new(),
            tail: String::new(),
            longest,
        }
    }

    /// Adds one token's bytes; true when the text now holds a stop string.
    pub fn push(&mut self, piece: &[u8]) -> bool {
        if self.stops.is_empty() {
            return false;
        }
        self.pending_bytes.extend_from_slice(piece);
        let fresh = take_complete_utf8(&mut self.pending_bytes);
        self.tail.push_str(&fresh);
        if find_stop(&self.tail, &self.stops).is_some() {
            return true;
        }
        // Any stop string that ends in a later token starts at most `longest - 1` bytes back.
        let keep_from = self.tail.len().saturating_sub(self.longest);
        let cut = (keep_from..=self.tail.len())
            .find(|&at| self.tail.is_char_boundary(at))
            .unwrap_or(self.tail.len());
        self.tail.drain(..cut);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_waits_for_whole_characters() {
        let mut bytes = vec![b'a', 0xC3];
        assert_eq!(take_complete_utf8(&mut bytes), "a");
        bytes.push(0xA9);
        assert_eq!(take_complete_utf8(&mut bytes), "é");
        let mut bad = vec![0xFF, b'b'];
        assert_eq!(take_complete_utf8(&mut bad), "\u{FFFD}b");
    }

    #[test]
    fn a_stop_string_spread_over_tokens_is_seen_at_the_token_that_completes_it() {
        let mut scanner = StopScanner::new(&["</end>".into(), "é.".into()]);
        let pieces: [&[u8]; 5] = [b"some text </", b"e", b"n", b"d", b"> more"];
        let seen: Vec<bool> = pieces.iter().map(|p| scanner.push(p)).collect();
        assert_eq!(seen, [false, false, false, false, true]);

        // A character split over two tokens, then the rest of the stop string.
        let mut scanner = StopScanner::new(&["é.".into()]);
        assert!(!scanner.push(&[b'x', 0xC3]));
        assert!(!scanner.push(&[0xA9]));
        assert!(scanner.push(b"."));
    }

    #[test]
    fn a_long_text_keeps_only_a_stop_strings_length() {
        let mut scanner = StopScanner::new(&["abc".into()]);
        for _ in 0..1000 {
            assert!(!scanner.push("wordé ".as_bytes()));
        }
        assert!(scanner.tail.len() <= 3);
        assert!(!scanner.push(b"ab"));
        assert!(scanner.push(b"c"));
        assert!(!StopScanner::new(&[]).push(b"anything"));
        assert!(!StopScanner::new(&[String::new()]).push(b"anything"));
    }
}
