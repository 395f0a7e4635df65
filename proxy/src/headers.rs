//! Header and request-target rewriting: what the workload sent made into
//! what the upstream receives (connection-level headers out, the workload's
//! own credential stripped, Leash's injected, origin-form target), and the
//! upstream's answer made safe to give back (the credential never echoed).

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Uri};

use crate::conn::RequestBody;
use crate::credential::{CachedCredential, InjectHow, InjectValue};
use crate::refusal::Refusal;
use crate::routes::EgressRoute;

/// Size of the request line and header block as sent (near enough: the
/// method/version framing is a few bytes either way).
pub fn header_block_len(req: &Request<RequestBody>) -> usize {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    req.headers()
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// The host of an absolute-form request (forward proxy), else of `Host`.
pub fn request_host(req: &Request<RequestBody>) -> Option<&str> {
    if let Some(host) = req.uri().host() {
        return Some(host.trim_end_matches('.'));
    }
    let host = req.headers().get(header::HOST)?.to_str().ok()?;
    // Strip a port, keeping bracketed IPv6 literals intact.
    let end = if host.starts_with('[') {
        host.find(']').map_or(host.len(), |i| i + 1)
    } else {
        host.rfind(':').unwrap_or(host.len())
    };
    Some(host[..end].trim_end_matches('.'))
}

static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Where `name` is in [`HOP_BY_HOP`] (a match on the lowercase name: cheaper
/// than comparing with each entry).
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    hop_by_hop_lowercase(name.as_str().as_bytes())
}

/// As [`hop_by_hop_index`], for a `Connection` token in any case.
fn hop_by_hop_token(token: &[u8]) -> Option<usize> {
    let mut lower = [0u8; 19];
    let buf = lower.get_mut(..token.len())?;
    for (d, s) in buf.iter_mut().zip(token) {
        *d = s.to_ascii_lowercase();
    }
    hop_by_hop_lowercase(buf)
}

fn hop_by_hop_lowercase(name: &[u8]) -> Option<usize> {
    Some(match name {
        b"connection" => 0,
        b"keep-alive" => 1,
        b"proxy-connection" => 2,
        b"proxy-authorization" => 3,
        b"te" => 4,
        b"trailer" => 5,
        b"upgrade" => 6,
        _ => return None,
    })
}

/// The workload's headers made into the upstream's: connection-level ones
/// removed, the credential injected (see `inject_credential`). Returns
/// whether the workload had sent a credential of its own.
pub fn upstream_headers(
    headers: &mut HeaderMap,
    extensions: &mut http::Extensions,
    inject: &InjectHow,
    value: &InjectValue,
) -> bool {
    // `TE: trailers` says the client accepts trailers. gRPC needs the
    // server to see it, and RFC 9113 §8.2.2 allows exactly that value in
    // HTTP/2: it is put back on an HTTP/2 upstream connection
    // (`upstream.rs`); otherwise `TE` is the connection's.
    if headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        extensions.insert(crate::body::TeTrailers);
    }
    strip_hop_by_hop(headers);
    inject_credential(headers, inject, value)
}

/// Whether `req` opens a WebSocket over HTTP/2 (RFC 8441): an extended
/// `CONNECT` with `:protocol websocket`.
pub fn is_websocket_connect<B>(req: &Request<B>) -> bool {
    req.method() == http::Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// Whether `req` is a WebSocket opening handshake: a `GET` over HTTP/1.1
/// asking to upgrade to `websocket` (RFC 6455 §4.1), or an extended
/// `CONNECT` over HTTP/2 (RFC 8441).
pub fn is_websocket_upgrade(req: &Request<RequestBody>) -> bool {
    if is_websocket_connect(req) {
        return true;
    }
    let has_token = |name: header::HeaderName, token: &[u8]| {
        req.headers().get_all(name).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
        })
    };
    req.method() == http::Method::GET
        && req.version() == http::Version::HTTP_11
        && has_token(header::UPGRADE, b"websocket")
        && has_token(header::CONNECTION, b"upgrade")
}

/// Puts back the two hop-by-hop headers a WebSocket handshake (and its
/// `101`) needs on the next hop.
pub fn ask_websocket_upgrade(headers: &mut HeaderMap) {
    headers.insert(
        header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    headers.insert(header::UPGRADE, http::HeaderValue::from_static("websocket"));
}

/// Removes connection-level headers, including any that `Connection` names.
/// (`Transfer-Encoding` is handled by hyper's codec on each side.)
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) headers notes which hop-by-hop ones are there
    // (usually none, or an upstream's `Connection: keep-alive`): only those
    // are then looked up and removed.
    let mut present = 0u8;
    for k in headers.keys() {
        if let Some(i) = hop_by_hop_index(k) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // HOP_BY_HOP[0] is `Connection`: what it names goes too, unless it is
    // one of the hop-by-hop headers removed below anyway.
    if present & 1 != 0
        && let http::header::Entry::Occupied(connection) = headers.entry(header::CONNECTION)
    {
        // Taken out with one lookup; the removal loop below skips it.
        present &= !1;
        let (_, values) = connection.remove_entry_mult();
        let mut named = Vec::new();
        let mut close = false;
        for value in values {
            for token in value.as_bytes().split(|b| *b == b',') {
                let token = token.trim_ascii();
                // The common tokens (`keep-alive`, `close`) are checked
                // without building a header name (which allocates).
                if token.is_empty() || hop_by_hop_token(token).is_some() {
                    continue;
                }
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if let Ok(name) = HeaderName::from_bytes(token) {
                    named.push(name);
                }
            }
        }
        if close {
            headers.remove("close");
        }
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Puts Leash's credential where the route says. A managed upstream only
/// ever sees Leash's credential: whatever the workload put there, and any
/// `Authorization` of its own, is replaced or removed. Returns whether there
/// was anything (the workload still holds a secret of its own).
pub fn inject_credential(headers: &mut HeaderMap, inject: &InjectHow, value: &InjectValue) -> bool {
    let mut stripped = false;
    let target = inject.header();
    if let (Some(name), InjectValue::Header(value)) = (target, value) {
        // `insert` replaces every value the workload sent under that name.
        stripped |= headers.insert(name.clone(), value.clone()).is_some();
    } else if let Some(name) = target {
        stripped |= headers.remove(name).is_some();
    }
    if target != Some(&header::AUTHORIZATION) {
        stripped |= headers.remove(header::AUTHORIZATION).is_some();
    }
    if let InjectHow::SigV4(_) = inject {
        stripped |= crate::sigv4::strip_headers(headers);
    }
    stripped
}

/// The request target sent upstream: the workload's path and query, with
/// the credential added to the query when the route injects it there. Also
/// says whether the workload had put a parameter of that name itself.
pub fn upstream_uri(
    route: &EgressRoute,
    method: &Method,
    uri: &Uri,
    credential: &CachedCredential,
) -> Result<(Uri, bool), Refusal> {
    let query = match (&route.inject, &credential.value) {
        (InjectHow::Query { param }, InjectValue::Query(value)) => Some((param.as_str(), value)),
        (InjectHow::SigV4(_), _) => return sigv4_target(method, uri),
        _ => None,
    };
    request_target(method, uri, query)
}

/// The target for a signed route: without a presigned request's own
/// parameters (the sidecar signs anew). Says whether there were any.
fn sigv4_target(method: &Method, uri: &Uri) -> Result<(Uri, bool), Refusal> {
    let (target, _) = request_target(method, uri, None)?;
    let Some(query) = target.query().and_then(crate::sigv4::strip_query) else {
        return Ok((target, false));
    };
    let pq = if query.is_empty() {
        target.path().to_owned()
    } else {
        format!("{}?{query}", target.path())
    };
    let uri = Uri::try_from(pq).map_err(|_| Refusal::BadRequest("request target"))?;
    Ok((uri, true))
}

/// Origin-form (RFC 9112 §3.2.1): the connection already goes to the
/// route's target, and hyper writes the request target as given. `query`
/// is the parameter and (percent-encoded) value to set in the query; any
/// parameter the workload sent whose *decoded* name is the same (`access%5Ftoken`,
/// one after a `;`) is removed, and the second value says there was one.
fn request_target(
    method: &Method,
    uri: &Uri,
    query: Option<(&str, &Bytes)>,
) -> Result<(Uri, bool), Refusal> {
    // OPTIONS to the server as a whole (asterisk-form) stays so. An
    // absolute-form target with an empty path, which RFC 9112 §3.2.4 would
    // also send as `*`, parses the same as `/` and is sent as `/`.
    if uri.path() == "*" {
        return match (method, query) {
            (&Method::OPTIONS, None) => Ok((Uri::from_static("*"), false)),
            (&Method::OPTIONS, Some(_)) => Err(Refusal::BadRequest(
                "OPTIONS * has no query to carry this route's credential: send OPTIONS to a path",
            )),
            _ => Err(Refusal::BadRequest(
                "the request target * is for OPTIONS only",
            )),
        };
    }
    let Some((param, value)) = query else {
        let pq = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        return Ok((Uri::from(pq), false));
    };
    let mut pq = String::with_capacity(uri.path().len() + value.len() + param.len() + 64);
    pq.push_str(if uri.path().is_empty() {
        "/"
    } else {
        uri.path()
    });
    pq.push('?');
    let mut own = false;
    if let Some(query) = uri.query() {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            // Some servers also split on `;`: each part is looked at.
            let mut kept = String::new();
            for part in pair.split(';') {
                let key = part.split_once('=').map_or(part, |(k, _)| k);
                let decoded: String = form_urlencoded::parse(key.as_bytes())
                    .map(|(k, _)| k)
                    .collect();
                if decoded == param {
                    own = true;
                } else {
                    if !kept.is_empty() {
                        kept.push(';');
                    }
                    kept.push_str(part);
                }
            }
            if !kept.is_empty() {
                pq.push_str(&kept);
                pq.push('&');
            }
        }
    }
    pq.push_str(param);
    pq.push('=');
    // Percent-encoded ASCII by construction.
    pq.push_str(
        std::str::from_utf8(value).map_err(|_| Refusal::BadRequest("credential encoding"))?,
    );
    let bytes = Bytes::from_owner(zeroize::Zeroizing::new(pq.into_bytes()));
    let pq = http::uri::PathAndQuery::from_maybe_shared(bytes)
        .map_err(|_| Refusal::BadRequest("invalid path"))?;
    Ok((Uri::from(pq), own))
}

/// Removes every response header whose value carries the injected
/// credential in one of its forms, and counts it for the control plane.
pub fn remove_echoes(headers: &mut HeaderMap, credential: &CachedCredential, route: &EgressRoute) {
    if credential.echo_forms.is_empty() {
        return;
    }
    let mut echoed: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter() {
        let v = value.as_bytes();
        if credential
            .echo_forms
            .iter()
            .any(|form| form.len() <= v.len() && memchr::memmem::find(v, form).is_some())
            && !echoed.contains(name)
        {
            echoed.push(name.clone());
        }
    }
    if echoed.is_empty() {
        return;
    }
    let mut counts = route.echoed.lock().unwrap_or_else(|p| p.into_inner());
    for name in echoed {
        headers.remove(&name);
        *counts.entry(name.as_str().to_owned()).or_default() += 1;
        tracing::warn!(upstream = %route.name, header = %name, credential_id = %credential.id, "the upstream sent the injected credential back; header removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_index_matches_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop_index(&header::CONTENT_LENGTH), None);
        assert_eq!(hop_by_hop_index(&HeaderName::from_static("x-te")), None);
        assert_eq!(hop_by_hop_token(b"Keep-Alive"), Some(1));
        assert_eq!(hop_by_hop_token(b"PROXY-AUTHORIZATION"), Some(3));
        assert_eq!(hop_by_hop_token(b"proxy-authorization-x"), None);
        assert_eq!(hop_by_hop_token(b"close"), None);
    }

    #[test]
    fn hop_by_hop_headers_and_what_connection_names_are_removed() {
        let mut h = headers(&[
            ("connection", "Keep-Alive, X-Private"),
            ("connection", " x-other ,close"),
            ("keep-alive", "timeout=5"),
            ("close", "a header named by a connection option"),
            ("x-private", "1"),
            ("x-other", "2"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eA=="),
            ("x-kept", "3"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-kept"]);

        // An answer with only `Connection: keep-alive` keeps everything else.
        let mut h = headers(&[("connection", "keep-alive"), ("content-length", "3")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_LENGTH));
    }

    #[test]
    fn the_injected_credential_replaces_the_workloads() {
        let value = InjectValue::Header("Bearer leash".parse().unwrap());
        let bearer = InjectHow::Basic {
            username: "u".into(),
        };
        let mut h = headers(&[("authorization", "Bearer own"), ("authorization", "x")]);
        assert!(inject_credential(&mut h, &bearer, &value));
        let all: Vec<_> = h.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(all, ["Bearer leash"]);

        let api_key = InjectHow::Header {
            name: HeaderName::from_static("x-api-key"),
            prefix: String::new(),
            suffix: String::new(),
        };
        let mut h = headers(&[("authorization", "Bearer own")]);
        assert!(inject_credential(&mut h, &api_key, &value));
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert_eq!(h["x-api-key"], "Bearer leash");
        let mut h = headers(&[("accept", "*/*")]);
        assert!(!inject_credential(&mut h, &api_key, &value));

        let query = InjectHow::Query {
            param: "key".into(),
        };
        let mut h = headers(&[("authorization", "Bearer own")]);
        assert!(inject_credential(
            &mut h,
            &query,
            &InjectValue::Query(Bytes::from_static(b"k"))
        ));
        assert!(h.is_empty());
    }

    #[test]
    fn the_request_target_is_origin_form() {
        let target = |method: Method, uri: &str, query: Option<(&str, &Bytes)>| {
            request_target(&method, &uri.parse().unwrap(), query).map(|(u, _)| u.to_string())
        };
        let key = Bytes::from_static(b"s%20k");
        let q = Some(("key", &key));
        assert_eq!(
            target(Method::GET, "http://h:1/a?b=1", None).unwrap(),
            "/a?b=1"
        );
        assert_eq!(target(Method::GET, "http://h", None).unwrap(), "/");
        assert_eq!(target(Method::GET, "/a", None).unwrap(), "/a");
        assert_eq!(
            target(Method::GET, "http://h/a?key=own&b=1&key=2", q).unwrap(),
            "/a?b=1&key=s%20k"
        );
        assert_eq!(target(Method::GET, "http://h", q).unwrap(), "/?key=s%20k");
        // OPTIONS to the whole server stays `*`, and cannot carry a query.
        assert_eq!(target(Method::OPTIONS, "*", None).unwrap(), "*");
        assert!(matches!(
            target(Method::GET, "*", None),
            Err(Refusal::BadRequest(_))
        ));
        assert!(matches!(
            target(Method::GET, "*", q),
            Err(Refusal::BadRequest(_))
        ));
        assert_eq!(target(Method::OPTIONS, "http://h/", None).unwrap(), "/");
        assert!(matches!(
            target(Method::OPTIONS, "*", q),
            Err(Refusal::BadRequest(_))
        ));
        assert_eq!(
            target(Method::OPTIONS, "http://h/", q).unwrap(),
            "/?key=s%20k"
        );
        // The workload's own parameter of that name, however it is encoded
        // or separated, is removed (and reported as stripped).
        for own in [
            "http://h/a?k%65y=own&b=1",
            "http://h/a?b=1;key=own",
            "http://h/a?b=1&%6B%65%79=own",
        ] {
            let (uri, stripped) = request_target(&Method::GET, &own.parse().unwrap(), q).unwrap();
            assert!(stripped, "{own}");
            assert!(!uri.to_string().contains("own"), "{own} -> {uri}");
        }
        let (_, stripped) =
            request_target(&Method::GET, &"http://h/a?b=1&keys=x".parse().unwrap(), q).unwrap();
        assert!(!stripped);
    }
}
