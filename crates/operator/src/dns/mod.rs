//! DNS authentication records of a SendingDomain, from spec to served records.
//!
//! The pipeline, in the order the SendingDomain controller runs it:
//! [`desired`] turns the spec, the pool's egress addresses and the DKIM public keys into the
//! records the domain needs (pure); [`plan`] compares them with what the provider holds and
//! decides the changes, touching only records mailfleet created (pure, with an ownership
//! registry); a provider ([`rfc2136`]; [`externaldns`], whose DNSEndpoint external-dns
//! publishes with its own ownership; none for `manual`) applies it; [`verify`] asks
//! the authoritative servers what they serve; [`spf`] counts the SPF record's DNS lookups
//! with its includes followed.

pub mod desired;
pub mod externaldns;
pub mod plan;
pub mod rfc2136;
pub mod spf;
pub mod verify;

use std::fmt;

/// Longest character-string of a TXT record (RFC 1035 §3.3).
pub const TXT_STRING_MAX: usize = 255;

/// The data of one record mailfleet manages.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordData {
    /// A TXT record: its character-strings, each at most 255 bytes.
    Txt(Vec<String>),
    /// An MX record.
    Mx {
        /// Preference (lower first).
        preference: u16,
        /// Exchange host, without the trailing dot.
        exchange: String,
    },
}

/// One record: owner name (lowercase, no trailing dot) and data.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Record {
    pub name: String,
    pub data: RecordData,
}

/// Record types mailfleet manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordType {
    Txt,
    Mx,
}

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordType::Txt => "TXT",
            RecordType::Mx => "MX",
        })
    }
}

impl Record {
    /// A TXT record holding `text`, split into 255-byte strings.
    pub fn txt(name: &str, text: &str) -> Record {
        Record {
            name: normalize(name),
            data: RecordData::Txt(split_txt(text)),
        }
    }

    /// An MX record.
    pub fn mx(name: &str, preference: u16, exchange: &str) -> Record {
        Record {
            name: normalize(name),
            data: RecordData::Mx {
                preference,
                exchange: normalize(exchange),
            },
        }
    }

    pub fn record_type(&self) -> RecordType {
        match self.data {
            RecordData::Txt(_) => RecordType::Txt,
            RecordData::Mx { .. } => RecordType::Mx,
        }
    }

    /// The value as status shows it and as records are compared: TXT strings joined (where a
    /// string boundary falls does not change the meaning), MX as `<preference> <exchange>`.
    pub fn value(&self) -> String {
        match &self.data {
            RecordData::Txt(parts) => parts.concat(),
            RecordData::Mx {
                preference,
                exchange,
            } => format!("{preference} {exchange}"),
        }
    }

    /// Same owner, type and value.
    pub fn same_as(&self, other: &Record) -> bool {
        self.name == other.name
            && self.record_type() == other.record_type()
            && self.value() == other.value()
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {:?}", self.name, self.record_type(), self.value())
    }
}

/// Lowercase, without the trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Splits `text` into character-strings of at most 255 bytes, never inside a UTF-8 character.
/// DKIM RSA-2048 keys (about 400 bytes of base64) need this.
pub fn split_txt(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > TXT_STRING_MAX {
        let mut cut = TXT_STRING_MAX;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        out.push(head.to_string());
        rest = tail;
    }
    out.push(rest.to_string());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_txt_is_one_string() {
        assert_eq!(split_txt("v=spf1 -all"), vec!["v=spf1 -all".to_string()]);
        assert_eq!(split_txt(""), vec![String::new()]);
    }

    #[test]
    fn long_txt_is_split_at_255_bytes_and_joins_back() {
        let text = "a".repeat(600);
        let parts = split_txt(&text);
        assert_eq!(
            parts.iter().map(String::len).collect::<Vec<_>>(),
            [255, 255, 90]
        );
        assert_eq!(parts.concat(), text);
        let exact = "b".repeat(255);
        assert_eq!(split_txt(&exact).len(), 1);
    }

    #[test]
    fn split_never_cuts_a_character() {
        let text = format!("{}é{}", "a".repeat(254), "z".repeat(10));
        let parts = split_txt(&text);
        assert_eq!(parts[0].len(), 254);
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn records_compare_by_joined_value() {
        let a = Record {
            name: "x.example.test".into(),
            data: RecordData::Txt(vec!["ab".into(), "cd".into()]),
        };
        let b = Record::txt("X.example.test.", "abcd");
        assert!(a.same_as(&b));
        assert_eq!(
            Record::mx("b.example.test", 10, "MX.example.test.").value(),
            "10 mx.example.test"
        );
    }
}
