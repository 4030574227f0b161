//! Text written by others (a Lease's holder, a command line), made safe to print: on
//! one line, and unable to steer a terminal.

use std::borrow::Cow;
use std::fmt::Write;

/// `s` with control characters and bidirectional-text controls escaped as Rust writes
/// them (`\n`, `\u{1b}`, `\u{202e}`); anything else, backslashes included, unchanged.
/// `-o json` output needs none of this: JSON escapes control characters itself.
pub(crate) fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' | '\t' | '\r' => {
                let _ = write!(out, "{}", c.escape_default());
            }
            c if needs_escape(c) => {
                let _ = write!(out, "{}", c.escape_unicode());
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Characters that can break a line, move the cursor, start an escape sequence, or
/// reorder the text around them (the "Trojan Source" controls).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert!(matches!(printable("pod-a"), Cow::Borrowed("pod-a")));
        assert_eq!(printable("DOMAIN\\user é"), "DOMAIN\\user é");
        assert_eq!(printable("a\nb\tc\rd"), "a\\nb\\tc\\rd");
        assert_eq!(printable("\u{1b}[31mred\u{7}"), "\\u{1b}[31mred\\u{7}");
        assert_eq!(printable("x\u{202e}y\u{85}"), "x\\u{202e}y\\u{85}");
    }
}
