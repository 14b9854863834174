//! Short strings (at most 255 bytes on the wire) built without panicking: `amq-protocol`'s
//! `ShortString::from` panics on a longer string, so nothing a peer sent or a row holds goes
//! through it. Use [`checked`] where an over-long value is an error to report, and [`truncated`]
//! for text Warren composes itself (reply texts, server-generated names).

use amq_protocol::types::{ShortString, MAX_SHORT_STRING_LENGTH};

/// `s` as a short string, or None when it is longer than 255 bytes.
pub fn checked(s: impl Into<String>) -> Option<ShortString> {
    ShortString::try_new(s).ok()
}

/// `s` as a short string, cut at a character boundary to at most 255 bytes.
pub fn truncated(s: impl Into<String>) -> ShortString {
    let mut s = s.into();
    if s.len() > MAX_SHORT_STRING_LENGTH {
        let mut cut = MAX_SHORT_STRING_LENGTH;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    ShortString::try_new(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_strings_are_refused_or_cut_at_a_char_boundary() {
        assert!(checked("x".repeat(255)).is_some());
        assert!(checked("x".repeat(256)).is_none());
        assert_eq!(truncated("ok").as_str(), "ok");
        let cut = truncated("é".repeat(200));
        assert_eq!(cut.as_str().len(), 254);
        assert_eq!(truncated("x".repeat(300)).as_str().len(), 255);
    }
}
