//! Just enough DER to read a certificate's serial number and validity: what renewal,
//! metrics and logs need. Verifying certificates is the clients' business (and rustls'
//! when a key is matched to its certificate), never this module's.

use super::TlsError;

/// What a leaf certificate says about itself that the server acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    /// Unix milliseconds.
    pub not_before: i64,
    pub not_after: i64,
    /// Hex, as `openssl x509 -serial` prints it (upper case, no separators).
    pub serial: String,
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// The next element's tag and contents.
    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.rest.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        let (contents, rest) = rest.split_at(len);
        self.rest = rest;
        Some((tag, contents))
    }

    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.next()? {
            (t, c) if t == tag => Some(c),
            _ => None,
        }
    }
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const VERSION: u8 = 0xa0;

/// Serial number and validity of a DER certificate.
pub fn leaf_info(der: &[u8]) -> Result<LeafInfo, TlsError> {
    parse(der).ok_or(TlsError::BadCertificate)
}

fn parse(der: &[u8]) -> Option<LeafInfo> {
    let cert = Reader { rest: der }.expect(SEQUENCE)?;
    let tbs = Reader { rest: cert }.expect(SEQUENCE)?;
    let mut tbs = Reader { rest: tbs };
    let (mut tag, mut contents) = tbs.next()?;
    if tag == VERSION {
        (tag, contents) = tbs.next()?;
    }
    if tag != INTEGER {
        return None;
    }
    // A positive serial may carry a leading zero byte so it does not read as negative.
    let serial = match contents {
        [0, rest @ ..] if !rest.is_empty() => rest,
        s => s,
    };
    let serial = hex::encode_upper(serial);
    tbs.expect(SEQUENCE)?; // signature algorithm
    tbs.expect(SEQUENCE)?; // issuer
    let mut validity = Reader {
        rest: tbs.expect(SEQUENCE)?,
    };
    let not_before = time_of(validity.next()?)?;
    let not_after = time_of(validity.next()?)?;
    Some(LeafInfo {
        not_before,
        not_after,
        serial,
    })
}

/// A `UTCTime` (`YYMMDDHHMMSSZ`) or `GeneralizedTime` (`YYYYMMDDHHMMSSZ`) as unix ms.
fn time_of((tag, text): (u8, &[u8])) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        UTC_TIME if text.len() == 12 => {
            let yy: i32 = text.get(..2)?.parse().ok()?;
            // RFC 5280: 50-99 are 19xx, 00-49 are 20xx.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        GENERALIZED_TIME if text.len() == 14 => (text.get(..4)?.parse().ok()?, &text[4..]),
        _ => return None,
    };
    if !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |i: usize| rest.get(i..i + 2).and_then(|s| s.parse::<u8>().ok());
    let month = time::Month::try_from(n(0)?).ok()?;
    let date = time::Date::from_calendar_date(year, month, n(2)?).ok()?;
    let at = date.with_hms(n(4)?, n(6)?, n(8)?).ok()?.assume_utc();
    at.unix_timestamp().checked_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
        serial: &[u8],
    ) -> Vec<u8> {
        let mut p =
            rcgen::CertificateParams::new(vec!["login.example.com".to_string()]).expect("params");
        p.not_before = not_before;
        p.not_after = not_after;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        let key = rcgen::KeyPair::generate().expect("key");
        p.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn reads_serial_and_validity() {
        let nb = time::macros::datetime!(2026-03-01 12:00:00 UTC);
        let na = time::macros::datetime!(2026-05-30 12:00:00 UTC);
        let info = leaf_info(&cert(nb, na, &[0x8a, 0x01, 0xff])).expect("parses");
        assert_eq!(info.not_before, nb.unix_timestamp() * 1000);
        assert_eq!(info.not_after, na.unix_timestamp() * 1000);
        assert_eq!(info.serial, "8A01FF");
    }

    #[test]
    fn generalized_time_after_2049() {
        let nb = time::macros::datetime!(2049-12-31 23:59:59 UTC);
        let na = time::macros::datetime!(2051-01-02 03:04:05 UTC);
        let info = leaf_info(&cert(nb, na, &[1])).expect("parses");
        assert_eq!(info.not_before, nb.unix_timestamp() * 1000);
        assert_eq!(info.not_after, na.unix_timestamp() * 1000);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(leaf_info(b"").is_err());
        assert!(leaf_info(&[0x30, 0x82, 0xff]).is_err());
        let nb = time::macros::datetime!(2026-03-01 12:00:00 UTC);
        let good = cert(nb, nb + time::Duration::days(1), &[7]);
        assert!(leaf_info(&good[..good.len() / 2]).is_err());
    }
}
