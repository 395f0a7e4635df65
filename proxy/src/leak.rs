//! The leaked-value scan (invariant I2): every candidate secret in a request
//! is fingerprinted with the control plane's key and looked up among the
//! registered leaked values, before anything is forwarded.
//!
//! Candidates are whole tokens, never arbitrary substrings: each header value
//! as a whole; the credential after an auth scheme (`Bearer x`); for `Basic`,
//! the decoded `user:password`, user and password; the parts of a header
//! value split on separators (`;`, `,`, `=`, `:`, spaces, quotes, brackets),
//! which covers cookies and `key=value` lists; each query parameter value,
//! raw and percent-decoded; and, where an upstream opts in, the same tokens
//! in the start of the body. A leaked value embedded inside a longer token
//! (`xx<leaked>yy`) is not matched: exact matching is what makes the scan
//! constant-time per candidate and free of false positives.

use base64::Engine as _;
use http::HeaderMap;
use leash_api::revocation::{FingerprintKey, MIN_LEAKED_LEN, RevocationSet, fingerprint};

/// Where a leaked value was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakHit {
    pub revocation_id: String,
    /// `header:<name>`, `query:<param>` or `body`.
    pub location: String,
}

fn is_separator(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t'
            | b','
            | b';'
            | b'='
            | b':'
            | b'"'
            | b'\''
            | b'('
            | b')'
            | b'{'
            | b'}'
            | b'['
            | b']'
            | b'<'
            | b'>'
            | b'&'
    )
}

struct Scanner<'a> {
    set: &'a RevocationSet,
    key: &'a FingerprintKey,
}

impl Scanner<'_> {
    fn check(&self, candidate: &[u8]) -> Option<String> {
        if candidate.len() < MIN_LEAKED_LEN {
            return None;
        }
        self.set
            .leaked(fingerprint(self.key, candidate))
            .map(|id| id.to_string())
    }

    /// The value, then its separator-delimited tokens.
    fn check_tokens(&self, value: &[u8]) -> Option<String> {
        self.check(value).or_else(|| {
            if !value.iter().any(|b| is_separator(*b)) {
                return None;
            }
            value
                .split(|b| is_separator(*b))
                .find_map(|t| self.check(t))
        })
    }

    fn check_header(&self, value: &[u8]) -> Option<String> {
        let value = value.trim_ascii();
        if let Some(hit) = self.check_tokens(value) {
            return Some(hit);
        }
        // `Scheme credential`: the credential may itself contain separators
        // (base64 padding, `token=`), so check it whole too.
        let space = value.iter().position(|b| *b == b' ')?;
        let (scheme, credential) = (&value[..space], value[space + 1..].trim_ascii());
        if let Some(hit) = self.check(credential) {
            return Some(hit);
        }
        if scheme.eq_ignore_ascii_case(b"basic") {
            let decoded = zeroize::Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(credential)
                    .ok()?,
            );
            if let Some(hit) = self.check(&decoded) {
                return Some(hit);
            }
            let colon = decoded.iter().position(|b| *b == b':')?;
            return self
                .check(&decoded[..colon])
                .or_else(|| self.check(&decoded[colon + 1..]));
        }
        None
    }
}

/// Scans headers and query of a request; `None` if nothing registered is in it.
pub fn scan_request(
    set: &RevocationSet,
    key: &FingerprintKey,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Option<LeakHit> {
    if !set.has_leaked() {
        return None;
    }
    let scanner = Scanner { set, key };
    for (name, value) in headers {
        if let Some(id) = scanner.check_header(value.as_bytes()) {
            return Some(LeakHit {
                revocation_id: id,
                location: format!("header:{name}"),
            });
        }
    }
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or(("", pair));
        let hit = scanner.check_tokens(value.as_bytes()).or_else(|| {
            let decoded = zeroize::Zeroizing::new(percent_decode(value.as_bytes())?);
            scanner.check_tokens(&decoded)
        });
        if let Some(id) = hit {
            return Some(LeakHit {
                revocation_id: id,
                location: format!("query:{name}"),
            });
        }
    }
    None
}

/// Scans the start of a body for registered values, token by token.
pub fn scan_body(set: &RevocationSet, key: &FingerprintKey, prefix: &[u8]) -> Option<LeakHit> {
    if !set.has_leaked() {
        return None;
    }
    let scanner = Scanner { set, key };
    let hit = prefix
        .split(|b| is_separator(*b) || b.is_ascii_whitespace())
        .find_map(|t| {
            scanner
                .check(t)
                .or_else(|| scanner.check(&percent_decode(t)?))
        });
    hit.map(|id| LeakHit {
        revocation_id: id,
        location: "body".into(),
    })
}

/// `%XX` and `+` decoding; `None` when there is nothing to decode.
fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    if !s.iter().any(|b| *b == b'%' || *b == b'+') {
        return None;
    }
    let hex = |c: u8| (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%'
            && i + 3 <= s.len()
            && let (Some(hi), Some(lo)) = (hex(s[i + 1]), hex(s[i + 2]))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(if s[i] == b'+' { b' ' } else { s[i] });
        i += 1;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use leash_api::revocation::fingerprint_bytes;
    use leash_api::v1::Revocation;

    const KEY: FingerprintKey = FingerprintKey([7; 16]);
    const LEAKED: &str = "sk_live_4f9a8b7c6d5e";

    fn set() -> RevocationSet {
        RevocationSet::new([Revocation {
            id: "rev-leak".into(),
            kind: "leaked".into(),
            fingerprint: fingerprint_bytes(fingerprint(&KEY, LEAKED.as_bytes())),
            ..Default::default()
        }])
        .unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn hit(pairs: &[(&str, &str)], query: Option<&str>) -> Option<String> {
        scan_request(&set(), &KEY, &headers(pairs), query).map(|h| h.location)
    }

    #[test]
    fn finds_the_value_wherever_a_credential_goes() {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("user:{LEAKED}"));
        let basic_user = base64::engine::general_purpose::STANDARD.encode(format!("{LEAKED}:x"));
        let api_query = format!("a=1&api_key={LEAKED}");
        type Case<'a> = (Vec<(&'a str, String)>, Option<&'a str>, &'a str);
        let cases: Vec<Case> = vec![
            (
                vec![("authorization", format!("Bearer {LEAKED}"))],
                None,
                "header:authorization",
            ),
            (
                vec![("authorization", format!("Basic {basic}"))],
                None,
                "header:authorization",
            ),
            (
                vec![("authorization", format!("Basic {basic_user}"))],
                None,
                "header:authorization",
            ),
            (
                vec![("x-api-key", LEAKED.to_owned())],
                None,
                "header:x-api-key",
            ),
            (
                vec![("cookie", format!("theme=dark; session={LEAKED}; lang=en"))],
                None,
                "header:cookie",
            ),
            (
                vec![("x-custom", format!("token=\"{LEAKED}\""))],
                None,
                "header:x-custom",
            ),
            (vec![], Some(api_query.as_str()), "query:api_key"),
            (vec![], Some("q=sk_live_4f9a8b7c6d5e%20"), "query:q"),
        ];
        for (pairs, query, location) in &cases {
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(
                hit(&pairs, *query).as_deref(),
                Some(*location),
                "{pairs:?} {query:?}"
            );
        }
    }

    #[test]
    fn clean_requests_and_longer_tokens_pass() {
        assert_eq!(
            hit(
                &[("authorization", "Bearer sk_live_other_value")],
                Some("a=b")
            ),
            None
        );
        // The leaked value inside a longer token is not a match (documented).
        let longer = format!("Bearer xx{LEAKED}yy");
        assert_eq!(hit(&[("authorization", &longer)], None), None);
        assert_eq!(hit(&[("x-id", "short")], None), None);
        // Nothing registered: no scan at all.
        assert!(
            scan_request(
                &RevocationSet::default(),
                &KEY,
                &headers(&[("x", LEAKED)]),
                None
            )
            .is_none()
        );
    }

    #[test]
    fn body_tokens() {
        let body = format!("{{\"user\":\"a\",\"api_key\":\"{LEAKED}\"}}");
        assert_eq!(
            scan_body(&set(), &KEY, body.as_bytes())
                .map(|h| h.location)
                .as_deref(),
            Some("body")
        );
        assert!(scan_body(&set(), &KEY, b"{\"api_key\":\"sk_live_something_else\"}").is_none());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode(b"a%20b+c").as_deref(), Some(&b"a b c"[..]));
        assert_eq!(percent_decode(b"abc"), None);
        assert_eq!(
            percent_decode(b"bad%zz%4").as_deref(),
            Some(&b"bad%zz%4"[..])
        );
    }
}
