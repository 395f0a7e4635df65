//! The leaked-value scan (invariant I2): every candidate secret in a request
//! is fingerprinted with the control plane's key and looked up among the
//! registered leaked values, before anything is forwarded.
//!
//! The registered side is only a keyed fingerprint, so the scan has to
//! produce the exact bytes of a registered value as one of its candidates.
//! Candidates are built from tokens, never from arbitrary substrings: one
//! hash lookup per candidate, a bounded number of candidates per byte, and no
//! false positives.
//!
//! **Fields.** A field (a header value, a path segment, a query parameter
//! name or value, a body window) is checked
//! - whole (leading and trailing whitespace trimmed);
//! - split into tokens: maximal runs of bytes that are not separators
//!   (whitespace `,` `;` `=` `:` `"` `'` `(` `)` `{` `}` `[` `]` `<` `>` `&`);
//! - as **runs**: every substring that starts at a token's start and ends at
//!   a token's end, spanning at most [`MAX_RUN_TOKENS`] tokens and
//!   [`MAX_RUN_LEN`] bytes, with its original separators. A registered value
//!   containing up to three separator runs (`id:secret`, `a;b`, `k=v`, a
//!   space) therefore matches wherever it appears whole;
//! - a run's end also extends over **base64 padding**: one or two `=` after
//!   the run's last token, if they end the field or are followed by another
//!   separator (`k=abc==; x` yields `abc==`, while `k=v` does not yield `k=`).
//!
//! Each run is produced once, by its last token, so a field of n tokens costs
//! at most 2 × [`MAX_RUN_TOKENS`] × n lookups.
//!
//! **Carriers and decodings.**
//! - Headers: each value as a field; raw and percent-decoded (`%XX` only:
//!   `+` is literal in headers); after an auth scheme (`Bearer x`), the
//!   credential whole; for `Basic`, the base64 credential decoded padded or
//!   unpadded (standard, then URL-safe alphabet), and the decoded
//!   `user:password`, user and password.
//! - Path: each `/` segment as a field, raw and percent-decoded (`%XX` only);
//!   and, for a value glued to a fixed prefix (`/bot<value>/send`), the
//!   suffixes of the segment after each of its first 1 to
//!   [`MAX_GLUED_PREFIX`] bytes, as long as those bytes are ASCII letters.
//!   "The suffix after the leading letter run" alone would miss values that
//!   themselves start with a letter (`botsk_live…`); cutting at every position
//!   inside the leading letter run catches them without substring search
//!   (at most [`MAX_GLUED_PREFIX`] lookups per segment).
//! - Query (split on `&`): each parameter name and each value as a field, raw
//!   and form-decoded (`%XX`, `+` as space).
//! - Userinfo in the request target's authority (`user:pass@host`), raw and
//!   percent-decoded.
//! - Body (where a route opts in with `scan_body_bytes`): a window of at most
//!   `limit` bytes, taken after any leading whitespace, from what the caller
//!   has read. `Content-Encoding: gzip`/`x-gzip`/`deflate` (zlib or raw) is
//!   inflated first, to at most `limit` + [`INFLATE_MARGIN`] bytes whatever
//!   the compressed input claims (a bomb costs that much and no more); the
//!   window is then taken from the inflated bytes (whitespace beyond the
//!   margin counts against the limit). If nothing inflates, the raw bytes
//!   are scanned. Other or stacked codings are scanned as they are. The
//!   window is a field; then, if it contains `%` or `+`, for
//!   `application/x-www-form-urlencoded` each name and value form-decoded
//!   (as in a query), otherwise each token form-decoded; then, if it
//!   contains a backslash, the window JSON-unescaped (`\uXXXX` including
//!   surrogate pairs, `\/`, `\"`, `\\`, `\n`…), whatever the content type.
//!
//! **Not matched** (documented limits): a registered value inside a longer
//! token (`xx<leaked>yy`) except after a letters-only prefix in a path
//! segment; a value spanning more than four tokens or 512 bytes, except as a
//! whole field; a value starting with a separator or ending with one other
//! than `=` padding, except as a whole field; a value split across path
//! segments (a raw `/` inside it); double percent-encoding; values shorter
//! than [`MIN_LEAKED_LEN`] (refused at registration, never a candidate).
//!
//! Every decoded copy is zeroized when dropped.

use std::cell::Cell;
use std::io::Read as _;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use http::{HeaderMap, Uri, header};
use leash_api::revocation::{FingerprintKey, MIN_LEAKED_LEN, RevocationSet, fingerprint};
use zeroize::Zeroizing;

/// Where a leaked value was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakHit {
    pub revocation_id: String,
    /// `header:<name>`, `path`, `query:<param>` (`query` if the name is long
    /// or unusual), `query-name`, `authority`, `body`, `body:gzip` or
    /// `body:deflate`. Never the value.
    pub location: String,
}

/// Most tokens a run spans.
pub const MAX_RUN_TOKENS: usize = 4;
/// Longest run checked, in bytes (a whole field is checked at any length).
pub const MAX_RUN_LEN: usize = 512;
/// Longest ASCII-letter prefix a value glued into a path segment may follow.
pub const MAX_GLUED_PREFIX: usize = 16;
/// Inflated bytes allowed beyond the scan limit (room for leading whitespace).
pub const INFLATE_MARGIN: usize = 1024;

const SEPARATORS: [bool; 256] = {
    let mut table = [false; 256];
    let set = b" \t\r\n\x0b\x0c,;=:\"'(){}[]<>&";
    let mut i = 0;
    while i < set.len() {
        table[set[i] as usize] = true;
        i += 1;
    }
    table
};

fn is_separator(b: u8) -> bool {
    SEPARATORS[usize::from(b)]
}

/// Base64 as `Basic` credentials are sent: padded or not.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);
const B64_URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

struct Scanner<'a> {
    set: &'a RevocationSet,
    key: &'a FingerprintKey,
    /// Fingerprints computed (the scan's cost, for tests).
    fingerprints: Cell<usize>,
}

impl<'a> Scanner<'a> {
    fn new(set: &'a RevocationSet, key: &'a FingerprintKey) -> Self {
        Self {
            set,
            key,
            fingerprints: Cell::new(0),
        }
    }

    fn check(&self, candidate: &[u8]) -> Option<String> {
        if candidate.len() < MIN_LEAKED_LEN {
            return None;
        }
        self.fingerprints.set(self.fingerprints.get() + 1);
        self.set
            .leaked(fingerprint(self.key, candidate))
            .map(|id| id.to_string())
    }

    /// The field whole, then its runs.
    fn field(&self, value: &[u8]) -> Option<String> {
        let value = value.trim_ascii();
        self.check(value).or_else(|| self.runs(value, |_| true))
    }

    /// Every run of 1 to [`MAX_RUN_TOKENS`] adjacent tokens with their
    /// separators, with and without trailing `=` padding; not the whole
    /// field (the caller checked it).
    fn runs(&self, value: &[u8], wanted: impl Fn(&[u8]) -> bool) -> Option<String> {
        // Starts of the last MAX_RUN_TOKENS tokens, as a ring.
        let mut starts = [0usize; MAX_RUN_TOKENS];
        let mut seen = 0usize;
        let mut i = 0;
        while i < value.len() {
            while i < value.len() && is_separator(value[i]) {
                i += 1;
            }
            if i == value.len() {
                break;
            }
            let start = i;
            while i < value.len() && !is_separator(value[i]) {
                i += 1;
            }
            starts[seen % MAX_RUN_TOKENS] = start;
            seen += 1;
            let ends = [Some(i), padding_end(value, i)];
            for back in 0..seen.min(MAX_RUN_TOKENS) {
                let s = starts[(seen - 1 - back) % MAX_RUN_TOKENS];
                if i - s > MAX_RUN_LEN {
                    break;
                }
                for e in ends.into_iter().flatten() {
                    if (s == 0 && e == value.len()) || e - s > MAX_RUN_LEN || !wanted(&value[s..e])
                    {
                        continue;
                    }
                    if let Some(hit) = self.check(&value[s..e]) {
                        return Some(hit);
                    }
                }
            }
        }
        None
    }

    /// A field, then its percent-decoded form (`+` as space if `plus`).
    fn decoded_field(&self, value: &[u8], plus: bool) -> Option<String> {
        self.field(value).or_else(|| {
            if value.len() < MIN_LEAKED_LEN {
                return None;
            }
            self.field(&percent_decode(value, plus)?)
        })
    }

    fn header(&self, value: &[u8]) -> Option<String> {
        let value = value.trim_ascii();
        self.field(value)
            .or_else(|| self.scheme_credential(value))
            .or_else(|| self.field(&percent_decode(value, false)?))
    }

    /// `Scheme credential`: the credential whole (it may hold more separators
    /// than a run spans) and, for `Basic`, decoded.
    fn scheme_credential(&self, value: &[u8]) -> Option<String> {
        let space = value.iter().position(|b| *b == b' ')?;
        let (scheme, credential) = (&value[..space], value[space + 1..].trim_ascii());
        let whole = if credential.iter().any(|b| is_separator(*b)) {
            self.check(credential)
        } else {
            None
        };
        whole.or_else(|| {
            if !scheme.eq_ignore_ascii_case(b"basic") {
                return None;
            }
            let decoded = Zeroizing::new(
                B64.decode(credential)
                    .or_else(|_| B64_URL.decode(credential))
                    .ok()?,
            );
            self.check(&decoded).or_else(|| {
                let colon = decoded.iter().position(|b| *b == b':')?;
                self.check(&decoded[..colon])
                    .or_else(|| self.check(&decoded[colon + 1..]))
            })
        })
    }

    fn path(&self, path: &[u8]) -> Option<String> {
        path.split(|b| *b == b'/')
            .filter(|s| s.len() >= MIN_LEAKED_LEN)
            .find_map(|segment| {
                self.segment(segment)
                    .or_else(|| self.segment(&percent_decode(segment, false)?))
            })
    }

    /// A segment as a field, then the suffixes after each cut inside its
    /// leading ASCII letters (a value glued to a prefix: `bot<value>`).
    fn segment(&self, segment: &[u8]) -> Option<String> {
        self.field(segment).or_else(|| {
            let letters = segment
                .iter()
                .take(MAX_GLUED_PREFIX)
                .take_while(|b| b.is_ascii_alphabetic())
                .count();
            (1..=letters).find_map(|cut| self.check(&segment[cut..]))
        })
    }

    /// `name=value&…` as in a query or a form body: names and values, raw
    /// and form-decoded.
    fn pairs(&self, query: &[u8]) -> Option<(String, String)> {
        for pair in query.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
            let (name, value) = match pair.iter().position(|b| *b == b'=') {
                Some(eq) => (&pair[..eq], Some(&pair[eq + 1..])),
                None => (pair, None),
            };
            if let Some(id) = self.decoded_field(name, true) {
                return Some((id, "query-name".into()));
            }
            if let Some(id) = value.and_then(|v| self.decoded_field(v, true)) {
                return Some((id, query_location(name)));
            }
        }
        None
    }

    fn request(&self, headers: &HeaderMap, uri: &Uri) -> Option<LeakHit> {
        let hit = |id, location| {
            Some(LeakHit {
                revocation_id: id,
                location,
            })
        };
        for (name, value) in headers {
            if let Some(id) = self.header(value.as_bytes()) {
                return hit(id, format!("header:{name}"));
            }
        }
        if let Some(id) = self.path(uri.path().as_bytes()) {
            return hit(id, "path".into());
        }
        if let Some((id, location)) = uri.query().and_then(|q| self.pairs(q.as_bytes())) {
            return hit(id, location);
        }
        if let Some((userinfo, _)) = uri.authority().and_then(|a| a.as_str().rsplit_once('@'))
            && let Some(id) = self.decoded_field(userinfo.as_bytes(), false)
        {
            return hit(id, "authority".into());
        }
        None
    }

    /// The body window: as a field (JSON-unescaped too if it holds a
    /// backslash); then form- or token-decoded.
    fn body_window(&self, window: &[u8], form: bool) -> Option<String> {
        let whole = window.trim_ascii();
        let fields = if whole.contains(&b'\\') {
            // Unescaping keeps every run without a backslash as a run (the
            // only escape holding a separator, `\"`, yields that separator),
            // so of the raw runs only those with a backslash need a lookup.
            self.field(&json_unescape(whole)).or_else(|| {
                self.check(whole)
                    .or_else(|| self.runs(whole, |run| run.contains(&b'\\')))
            })
        } else {
            self.field(whole)
        };
        fields.or_else(|| {
            if !window.iter().any(|b| *b == b'%' || *b == b'+') {
                None
            } else if form {
                self.pairs(window).map(|(id, _)| id)
            } else {
                window
                    .split(|b| is_separator(*b))
                    .filter(|t| t.len() >= MIN_LEAKED_LEN)
                    .find_map(|t| self.field(&percent_decode(t, true)?))
            }
        })
    }

    fn body(&self, headers: &HeaderMap, prefix: &[u8], limit: usize) -> Option<LeakHit> {
        const FORM: &[u8] = b"application/x-www-form-urlencoded";
        let form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.as_bytes().get(..FORM.len()))
            .is_some_and(|t| t.eq_ignore_ascii_case(FORM));
        // Deflate expands a byte to at most 1032: no need to make room for
        // more than the input can give.
        let cap = limit
            .saturating_add(INFLATE_MARGIN)
            .min(prefix.len().saturating_mul(1032).saturating_add(64));
        let inflated =
            content_coding(headers).map(|coding| (inflate(coding, prefix, cap), coding.location()));
        let (bytes, location) = match &inflated {
            Some((decoded, location)) if !decoded.is_empty() => (&decoded[..], *location),
            _ => (prefix, "body"),
        };
        let start = bytes
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(bytes.len());
        let window = &bytes[start..];
        let window = &window[..window.len().min(limit)];
        self.body_window(window, form).map(|id| LeakHit {
            revocation_id: id,
            location: location.into(),
        })
    }
}

/// The end of one or two `=` of base64 padding after `end`, if they end the
/// field or another separator follows them.
fn padding_end(value: &[u8], end: usize) -> Option<usize> {
    let pad = value[end..]
        .iter()
        .take(3)
        .take_while(|b| **b == b'=')
        .count();
    ((1..=2).contains(&pad) && value.get(end + pad).is_none_or(|b| is_separator(*b)))
        .then_some(end + pad)
}

/// `query:<name>` for an ordinary parameter name, else `query`.
fn query_location(name: &[u8]) -> String {
    let ordinary = !name.is_empty()
        && name.len() <= 64
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.[]".contains(b));
    match std::str::from_utf8(name) {
        Ok(name) if ordinary => format!("query:{name}"),
        _ => "query".into(),
    }
}

/// Scans the path, query (names and values), request-target userinfo and
/// headers of a request; `None` if nothing registered is in them.
pub fn scan_request(
    set: &RevocationSet,
    key: &FingerprintKey,
    headers: &HeaderMap,
    uri: &Uri,
) -> Option<LeakHit> {
    if !set.has_leaked() {
        return None;
    }
    Scanner::new(set, key).request(headers, uri)
}

/// Scans the start of a body: at most `limit` bytes after leading
/// whitespace, inflated first if `headers` name a gzip or deflate
/// `Content-Encoding`. `prefix` may be longer than `limit`.
pub fn scan_body(
    set: &RevocationSet,
    key: &FingerprintKey,
    headers: &HeaderMap,
    prefix: &[u8],
    limit: usize,
) -> Option<LeakHit> {
    if !set.has_leaked() || limit == 0 {
        return None;
    }
    Scanner::new(set, key).body(headers, prefix, limit)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Gzip,
    Deflate,
}

impl Coding {
    fn location(self) -> &'static str {
        match self {
            Self::Gzip => "body:gzip",
            Self::Deflate => "body:deflate",
        }
    }
}

/// The body's one content coding, if it is one the scan inflates.
fn content_coding(headers: &HeaderMap) -> Option<Coding> {
    let mut values = headers.get_all(header::CONTENT_ENCODING).iter();
    let value = values.next()?.as_bytes().trim_ascii();
    if values.next().is_some() {
        return None;
    }
    if value.eq_ignore_ascii_case(b"gzip") || value.eq_ignore_ascii_case(b"x-gzip") {
        Some(Coding::Gzip)
    } else if value.eq_ignore_ascii_case(b"deflate") {
        Some(Coding::Deflate)
    } else {
        None
    }
}

/// Inflates `input` to at most `cap` bytes (whatever it would inflate to),
/// keeping what decoded before any error.
fn inflate(coding: Coding, input: &[u8], cap: usize) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(vec![0u8; cap]);
    let zlib = input.len() >= 2
        && input[0] & 0x0f == 8
        && (u16::from(input[0]) << 8 | u16::from(input[1])) % 31 == 0;
    let mut reader: Box<dyn std::io::Read + '_> = match coding {
        Coding::Gzip => Box::new(flate2::bufread::GzDecoder::new(input)),
        Coding::Deflate if zlib => Box::new(flate2::bufread::ZlibDecoder::new(input)),
        Coding::Deflate => Box::new(flate2::bufread::DeflateDecoder::new(input)),
    };
    let mut filled = 0;
    while filled < cap {
        match reader.read(&mut out[filled..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => filled += n,
        }
    }
    out.truncate(filled);
    out
}

/// `%XX` decoding, and `+` as space if `plus`; `None` when nothing changes.
/// The result is never longer than the input.
fn percent_decode(s: &[u8], plus: bool) -> Option<Zeroizing<Vec<u8>>> {
    if !s.iter().any(|b| *b == b'%' || (plus && *b == b'+')) {
        return None;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(s.len()));
    let mut changed = false;
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                s.get(i + 1).and_then(|c| hex(*c)),
                s.get(i + 2).and_then(|c| hex(*c)),
            )
        {
            out.push(hi << 4 | lo);
            changed = true;
            i += 3;
            continue;
        }
        if plus && s[i] == b'+' {
            out.push(b' ');
            changed = true;
        } else {
            out.push(s[i]);
        }
        i += 1;
    }
    changed.then_some(out)
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hex4(s: &[u8], at: usize) -> Option<u32> {
    s.get(at..at + 4)?
        .iter()
        .try_fold(0u32, |acc, c| Some(acc << 4 | u32::from(hex(*c)?)))
}

/// JSON string escapes undone (`\"`, `\\`, `\/`, `\b`, `\f`, `\n`, `\r`,
/// `\t`, `\uXXXX` with surrogate pairs, as UTF-8); anything else, including
/// lone surrogates, is kept as it is. Never longer than the input.
fn json_unescape(s: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(s.len()));
    let mut i = 0;
    while i < s.len() {
        if s[i] != b'\\' || i + 1 == s.len() {
            out.push(s[i]);
            i += 1;
            continue;
        }
        let simple = match s[i + 1] {
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            b'/' => Some(b'/'),
            b'b' => Some(0x08),
            b'f' => Some(0x0c),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            i += 2;
            continue;
        }
        if s[i + 1] == b'u'
            && let Some(unit) = hex4(s, i + 2)
        {
            let low = if (0xD800..0xDC00).contains(&unit) && s.get(i + 6..i + 8) == Some(b"\\u") {
                hex4(s, i + 8).filter(|low| (0xDC00..0xE000).contains(low))
            } else {
                None
            };
            let (c, used) = match low {
                Some(low) => (
                    char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)),
                    12,
                ),
                _ => (char::from_u32(unit), 6),
            };
            if let Some(c) = c {
                let mut utf8 = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
                i += used;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use leash_api::revocation::{RevocationKind, fingerprint_bytes};
    use leash_api::v1::Revocation;

    const KEY: FingerprintKey = FingerprintKey([7; 16]);
    const LEAKED: &str = "sk_live_4f9a8b7c6d5e";

    fn set_of(values: &[&str]) -> RevocationSet {
        RevocationSet::new(values.iter().enumerate().map(|(i, v)| Revocation {
            id: if i == 0 {
                "rev-leak".into()
            } else {
                format!("rev-leak-{i}")
            },
            kind: RevocationKind::Leaked.into(),
            fingerprint: fingerprint_bytes(fingerprint(&KEY, v.as_bytes())),
            ..Default::default()
        }))
        .unwrap()
    }

    fn set() -> RevocationSet {
        set_of(&[LEAKED])
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

    fn uri(target: &str) -> Uri {
        target.parse().unwrap()
    }

    fn hit(pairs: &[(&str, &str)], query: Option<&str>) -> Option<String> {
        let target = match query {
            Some(q) => format!("/x?{q}"),
            None => "/x".into(),
        };
        scan_request(&set(), &KEY, &headers(pairs), &uri(&target)).map(|h| h.location)
    }

    fn at(set: &RevocationSet, pairs: &[(&str, &str)], target: &str) -> Option<String> {
        scan_request(set, &KEY, &headers(pairs), &uri(target)).map(|h| h.location)
    }

    fn body_at(set: &RevocationSet, pairs: &[(&str, &str)], body: &[u8]) -> Option<String> {
        scan_body(set, &KEY, &headers(pairs), body, 4096).map(|h| h.location)
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
                vec![("cookie", "theme=dark; k=sk%5Flive%5F4f9a8b7c6d5e".into())],
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
            (vec![], Some("a=1&sk_live_4f9a8b7c6d5e=1"), "query-name"),
            (vec![], Some("sk%5Flive_4f9a8b7c6d5e"), "query-name"),
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
    fn path_segments_raw_encoded_and_glued() {
        let set = set();
        for target in [
            format!("/hooks/{LEAKED}"),
            format!("/hooks/{LEAKED}/run"),
            "/hooks/sk%5Flive%5F4f9a8b7c6d5e".to_owned(),
            format!("/bot{LEAKED}/sendMessage"),
            format!("/b{LEAKED}"),
            format!("/abcdefghijklmnop{LEAKED}"),
            format!("/v1/x;key={LEAKED}"),
            format!("http://api.example.com/bot{LEAKED}/send?x=1"),
            "/bot%73k_live_4f9a8b7c6d5e/send".to_owned(),
        ] {
            assert_eq!(at(&set, &[], &target).as_deref(), Some("path"), "{target}");
        }
        // A glued prefix longer than MAX_GLUED_PREFIX letters, or not only
        // letters, is not cut.
        for target in [
            format!("/abcdefghijklmnopq{LEAKED}"),
            format!("/v1_{LEAKED}"),
            format!("/{LEAKED}x"),
        ] {
            assert_eq!(at(&set, &[], &target), None, "{target}");
        }
    }

    #[test]
    fn separators_inside_a_registered_value() {
        let values = [
            "AKIAEXAMPLE:wJalrXUtnFEMI",
            "c2VjcmV0LXZhbHVlLTE=",
            "c2VjcmV0LXZhbHVlLTEy==",
            "part-one;part-two",
            "k=v:w;xyz",
            "correct horse battery",
        ];
        let set = set_of(&values);
        let b64 = base64::engine::general_purpose::STANDARD;
        for v in values {
            let enc: String = v.bytes().map(|b| format!("%{b:02X}")).collect();
            let headers_cases = [
                ("x-api-key", v.to_owned()),
                ("authorization", format!("Bearer {v}")),
                ("cookie", format!("a=b; t={v}; c=d")),
                ("x-list", format!("one, {v}, two")),
                ("cookie", format!("a=b; t={enc}")),
            ];
            for (name, value) in &headers_cases {
                assert_eq!(
                    at(&set, &[(name, value)], "/").as_deref(),
                    Some(format!("header:{name}").as_str()),
                    "{value}"
                );
            }
            let basic = format!("Basic {}", b64.encode(format!("u:{v}")));
            assert!(at(&set, &[("authorization", &basic)], "/").is_some());
            assert_eq!(
                at(&set, &[], &format!("/x?q={enc}")).as_deref(),
                Some("query:q")
            );
            if !v.contains(' ') {
                assert_eq!(
                    at(&set, &[], &format!("/x?a=1&q={v}&b=2")).as_deref(),
                    Some("query:q"),
                    "{v}"
                );
            }
            let json = format!("{{\"a\":1,\"key\":\"{v}\",\"b\":[1]}}");
            assert_eq!(body_at(&set, &[], json.as_bytes()).as_deref(), Some("body"));
        }
        // Five separator runs is more than a run spans: only whole fields.
        let five = "a1:b2:c3:d4:e5:f6";
        let set = set_of(&[five]);
        assert!(at(&set, &[("x", five)], "/").is_some());
        assert!(at(&set, &[("x", &format!("k={five}"))], "/").is_none());
    }

    #[test]
    fn basic_padded_and_unpadded() {
        let set = set();
        for engine in [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            for plain in [
                format!("u:{LEAKED}"),
                format!("{LEAKED}:"),
                format!("{LEAKED}x:p"),
            ] {
                let value = format!("Basic {}", engine.encode(&plain));
                let found = at(&set, &[("authorization", &value)], "/");
                assert_eq!(found.is_some(), !plain.ends_with("x:p"), "{plain}");
            }
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
                &uri(&format!("/{LEAKED}")),
            )
            .is_none()
        );
    }

    #[test]
    fn short_values_are_never_candidates() {
        let short = "abc1234";
        assert!(short.len() < MIN_LEAKED_LEN);
        let set = set_of(&[short]);
        let b64 = base64::engine::general_purpose::STANDARD;
        let basic = format!("Basic {}", b64.encode(format!("{short}:{short}")));
        let bearer = format!("Bearer {short}");
        for (pairs, target) in [
            (vec![("x", short)], "/".to_owned()),
            (vec![("authorization", bearer.as_str())], "/".into()),
            (vec![("authorization", basic.as_str())], "/".into()),
            (vec![], format!("/{short}/bot{short}?{short}={short}")),
        ] {
            assert_eq!(at(&set, &pairs, &target), None);
        }
        assert_eq!(body_at(&set, &[], short.as_bytes()), None);
        assert_eq!(
            body_at(&set, &[], format!("{{\"k\":\"{short}\"}}").as_bytes()),
            None
        );
    }

    #[test]
    fn body_tokens() {
        let body = format!("{{\"user\":\"a\",\"api_key\":\"{LEAKED}\"}}");
        assert_eq!(
            body_at(&set(), &[], body.as_bytes()).as_deref(),
            Some("body")
        );
        assert!(body_at(&set(), &[], b"{\"api_key\":\"sk_live_something_else\"}").is_none());
    }

    #[test]
    fn json_form_and_whitespace_in_bodies() {
        let set = set();
        let json = [("content-type", "application/json")];
        for body in [
            r#"{"k":"sk\u005flive\u005f4f9a8b7c6d5e"}"#,
            r#"{"k":"sk\u005Flive_4f9a8b7c6d5e"}"#,
            r#"{"k":"\"sk_live_4f9a8b7c6d5e\""}"#,
            r#"["x", "sk_live_4f9a8b7c6d5e"]"#,
        ] {
            assert_eq!(
                body_at(&set, &json, body.as_bytes()).as_deref(),
                Some("body"),
                "{body}"
            );
        }
        let slashed = "sk/live/4f9a8b7c6d5e";
        let set2 = set_of(&[slashed]);
        assert!(body_at(&set2, &json, br#"{"k":"sk\/live\/4f9a8b7c6d5e"}"#).is_some());
        // Surrogate pairs decode to one character.
        let emoji = "key\u{1F600}secret";
        let set3 = set_of(&[emoji]);
        assert!(body_at(&set3, &json, br#"{"k":"key\ud83d\ude00secret"}"#).is_some());

        // A value holding a literal backslash escape is found raw, and the
        // raw runs without a backslash are not looked up twice.
        let literal = r"C:\new\table-ab";
        let set4 = set_of(&[literal]);
        assert!(body_at(&set4, &[], format!("path={literal}; x=1").as_bytes()).is_some());
        let mut escaped = br#"{"a":"\u0041""#.to_vec();
        for i in 0..50 {
            escaped.extend_from_slice(format!(r#","key{i:04}":"value{i:04}""#).as_bytes());
        }
        escaped.push(b'}');
        let scanner = Scanner::new(&set, &KEY);
        assert!(scanner.body_window(&escaped, false).is_none());
        let both = scanner.fingerprints.get();
        let scanner = Scanner::new(&set, &KEY);
        assert!(scanner.field(&json_unescape(&escaped)).is_none());
        let unescaped = scanner.fingerprints.get();
        // The raw window whole, and at most the runs (with padding) that
        // hold the one token with a backslash.
        let with_backslash = MAX_RUN_TOKENS * (MAX_RUN_TOKENS + 1);
        assert!(
            unescaped > 200 && both <= unescaped + 1 + with_backslash,
            "{both} {unescaped}"
        );

        let form = [("content-type", "application/x-www-form-urlencoded")];
        assert_eq!(
            body_at(&set, &form, b"a=1&token=sk%5Flive%5F4f9a8b7c6d5e").as_deref(),
            Some("body")
        );
        let spaced = set_of(&["correct horse battery"]);
        assert!(body_at(&spaced, &form, b"a=1&p=correct+horse+battery").is_some());
        assert!(body_at(&spaced, &form, b"a=1&p=correct:horse%20battery").is_none());
        // Encoded separators next to raw ones, decoded pairwise in forms.
        let colon = set_of(&["abcd:efgh=="]);
        assert!(body_at(&colon, &form, b"a=1&p=abcd:efgh%3D%3D").is_some());

        // Leading whitespace does not count against the limit.
        let mut padded = vec![b' '; 8192];
        padded.extend_from_slice(LEAKED.as_bytes());
        assert_eq!(
            scan_body(&set, &KEY, &HeaderMap::new(), &padded, 64).map(|h| h.location),
            Some("body".into())
        );
        // The limit bounds what is scanned.
        let mut late = vec![b'x'; 100];
        late.push(b' ');
        late.extend_from_slice(LEAKED.as_bytes());
        assert!(scan_body(&set, &KEY, &HeaderMap::new(), &late, 100).is_none());
        assert!(scan_body(&set, &KEY, &HeaderMap::new(), &late, 200).is_some());
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn compressed_bodies() {
        use std::io::Write as _;
        let set = set();
        let body = format!("{{\"a\":\"b\",\"key\":\"{LEAKED}\"}}");
        let gz = gzip(body.as_bytes());
        assert_eq!(
            body_at(&set, &[("content-encoding", "gzip")], &gz).as_deref(),
            Some("body:gzip")
        );
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(body.as_bytes()).unwrap();
        let zlib = z.finish().unwrap();
        let mut d = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        d.write_all(body.as_bytes()).unwrap();
        let raw = d.finish().unwrap();
        for data in [&zlib, &raw] {
            assert_eq!(
                body_at(&set, &[("content-encoding", "Deflate")], data).as_deref(),
                Some("body:deflate")
            );
        }
        // A truncated stream: what inflated is scanned.
        let mut long = vec![b'a'; 3000];
        long.extend_from_slice(b" sk_live_4f9a8b7c6d5e ");
        long.extend(std::iter::repeat_n(b'z', 3000));
        let gz = gzip(&long);
        assert_eq!(
            body_at(&set, &[("content-encoding", "gzip")], &gz[..gz.len() - 12]).as_deref(),
            Some("body:gzip")
        );
        // Labelled gzip but not: the raw bytes are scanned.
        assert_eq!(
            body_at(&set, &[("content-encoding", "gzip")], body.as_bytes()).as_deref(),
            Some("body")
        );
        // A clean compressed body passes.
        assert!(body_at(&set, &[("content-encoding", "gzip")], &gzip(b"{\"a\":1}")).is_none());
    }

    #[test]
    fn a_gzip_bomb_inflates_to_the_limit_and_no_further() {
        use std::io::Write as _;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..50 {
            e.write_all(&zeros).unwrap();
        }
        let bomb = e.finish().unwrap();
        let limit = 4096;
        let out = inflate(Coding::Gzip, &bomb, limit + INFLATE_MARGIN);
        assert_eq!(out.len(), limit + INFLATE_MARGIN);
        assert!(out.capacity() <= limit + INFLATE_MARGIN);
        let set = set();
        let scanner = Scanner::new(&set, &KEY);
        let h = headers(&[("content-encoding", "gzip")]);
        assert!(scanner.body(&h, &bomb, limit).is_none());
        // Zeros are one token: one fingerprint for the whole window.
        assert!(scanner.fingerprints.get() <= 2);
    }

    #[test]
    fn cost_is_linear_in_segments_and_tokens() {
        let set = set();
        let scanner = Scanner::new(&set, &KEY);
        let n = 10_000;
        let path: String = (0..n).map(|i| format!("/abcdefgh{i:05}")).collect();
        assert!(scanner.path(path.as_bytes()).is_none());
        // Per segment: whole, then cuts after 1 to 8 letters (suffixes of 8
        // bytes or more: 6 of them).
        assert!(
            scanner.fingerprints.get() <= 7 * n,
            "{}",
            scanner.fingerprints.get()
        );

        let scanner = Scanner::new(&set, &KEY);
        let value: String = (0..n).map(|i| format!("tok{i:05};")).collect();
        assert!(scanner.header(value.as_bytes()).is_none());
        assert!(
            scanner.fingerprints.get() <= 2 * MAX_RUN_TOKENS * n + 2,
            "{}",
            scanner.fingerprints.get()
        );
    }

    #[test]
    fn runs_and_padding() {
        for (value, field) in [
            ("abcdefg==", "k=abcdefg==; x=1"),
            ("abcdefg=", "k=abcdefg="),
            ("abcd:efgh", "x abcd:efgh y"),
            ("k=abcdefgh", "k=abcdefgh; z"),
        ] {
            let set = set_of(&[value]);
            let scanner = Scanner::new(&set, &KEY);
            assert!(
                scanner.field(field.as_bytes()).is_some(),
                "{value} in {field}"
            );
        }
        // `k=v` is not padding: `k=` is never a candidate.
        assert_eq!(padding_end(b"k=v", 1), None);
        assert_eq!(padding_end(b"abc==", 3), Some(5));
        assert_eq!(padding_end(b"abc===", 3), None);
        assert_eq!(padding_end(b"abc=;", 3), Some(4));
    }

    #[test]
    fn decoders() {
        assert_eq!(
            percent_decode(b"a%20b+c", true).as_deref().map(|v| &v[..]),
            Some(&b"a b c"[..])
        );
        assert_eq!(
            percent_decode(b"a%20b+c", false).as_deref().map(|v| &v[..]),
            Some(&b"a b+c"[..])
        );
        assert!(percent_decode(b"abc", true).is_none());
        assert!(percent_decode(b"bad%zz%4", true).is_none());
        assert_eq!(
            &json_unescape(br#"a\u005fb\/c\"d\\e\n\uD83D\uDE00\uD800x\q\"#)[..],
            "a_b/c\"d\\e\n\u{1F600}\\uD800x\\q\\".as_bytes()
        );
    }

    #[test]
    fn locations_never_hold_odd_names() {
        assert_eq!(query_location(b"api_key"), "query:api_key");
        assert_eq!(query_location(b"a%20b"), "query");
        assert_eq!(query_location(&[b'a'; 65]), "query");
        assert_eq!(query_location(b""), "query");
    }
}
