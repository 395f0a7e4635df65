//! Lets gRPC clients built on grpc-core (Python, C++, Ruby…) and grpc-java
//! reach a tonic server over a Unix socket. Those clients send the socket
//! path as the HTTP/2 `:authority` (`/run/spire/agent.sock`), which is not
//! an authority (RFC 3986: no `/`), and the `h2` crate resets every such
//! stream with `PROTOCOL_ERROR` before tonic sees it; SPIRE's agent (Go)
//! accepts it.
//!
//! The sound way here is at the HTTP/2 layer, between the socket and the
//! server: the client's header blocks are decoded with the client's HPACK
//! state (a real HPACK decoder, `loona-hpack`), an `:authority` that is not
//! a valid authority is replaced by `localhost`, and the block is encoded
//! again for the server, every field as a literal that is never indexed
//! (so the server's HPACK table stays empty and nothing has to be kept in
//! step with it). Every other frame, and everything the server sends, is
//! copied as it is. The Workload API routes by `:path`; the authority
//! carried no meaning for it.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The default SETTINGS_MAX_FRAME_SIZE: what frames to the server stay under.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this (over its frames) ends the connection.
const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// Relays one connection: `client` to `server` with header blocks
/// rewritten as above, `server` to `client` untouched, until either ends.
pub async fn relay<C, S>(client: C, server: S)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = tokio::io::split(server);
    let up = async {
        let r = rewrite(&mut cr, &mut sw).await;
        let _ = sw.shutdown().await;
        r
    };
    let down = async {
        let r = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
        r.map(|_| ())
    };
    let (up, down) = tokio::join!(up, down);
    if let Err(e) = up.and(down) {
        tracing::debug!(error = %e, "workload API connection ended");
    }
}

/// The client-to-server direction.
async fn rewrite<R, W>(from: &mut R, to: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE.len()];
    from.read_exact(&mut preface).await?;
    to.write_all(&preface).await?;
    if preface != PREFACE {
        // Not HTTP/2 with prior knowledge: the server will say so.
        tokio::io::copy(from, to).await?;
        return Ok(());
    }
    let mut decoder = loona_hpack::Decoder::new();
    loop {
        let Some((head, payload)) = read_frame(from).await? else {
            return Ok(());
        };
        if head[3] != HEADERS {
            to.write_all(&head).await?;
            to.write_all(&payload).await?;
            continue;
        }
        let flags = head[4];
        let stream = [head[5], head[6], head[7], head[8]];
        let (priority, mut block) = headers_fragment(flags, &payload)?;
        let mut end = flags & END_HEADERS != 0;
        while !end {
            let Some((cont, more)) = read_frame(from).await? else {
                return Ok(());
            };
            if cont[3] != CONTINUATION || cont[5..9] != stream {
                return Err(invalid("a header block interrupted"));
            }
            end = cont[4] & END_HEADERS != 0;
            block.extend_from_slice(&more);
            if block.len() > MAX_HEADER_BLOCK {
                return Err(invalid("header block too large"));
            }
        }
        let fields = decoder
            .decode(&block)
            .map_err(|e| invalid(&format!("HPACK: {e:?}")))?;
        let encoded = encode(&fields);
        write_headers(to, flags & END_STREAM, stream, priority, &encoded).await?;
    }
}

/// A frame's 9-byte head and its payload; `None` at a clean end.
async fn read_frame<R: AsyncRead + Unpin>(from: &mut R) -> io::Result<Option<([u8; 9], Vec<u8>)>> {
    let mut head = [0u8; 9];
    match from.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    if len > MAX_HEADER_BLOCK.max(MAX_FRAME) {
        return Err(invalid("frame larger than the server accepts"));
    }
    let mut payload = vec![0u8; len];
    from.read_exact(&mut payload).await?;
    Ok(Some((head, payload)))
}

/// A HEADERS payload without its padding: the priority fields (if any) and
/// the header block fragment.
fn headers_fragment(flags: u8, payload: &[u8]) -> io::Result<(Option<[u8; 5]>, Vec<u8>)> {
    let mut p = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, rest) = p.split_first().ok_or_else(|| invalid("padding"))?;
        pad = usize::from(n);
        p = rest;
    }
    let priority = if flags & PRIORITY != 0 {
        let fields: [u8; 5] = p
            .get(..5)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| invalid("priority"))?;
        p = &p[5..];
        Some(fields)
    } else {
        None
    };
    let end = p.len().checked_sub(pad).ok_or_else(|| invalid("padding"))?;
    Ok((priority, p[..end].to_vec()))
}

/// Whether `value` is an authority the `h2` crate takes.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// The fields as literals never indexed, an invalid `:authority` replaced.
fn encode(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        let value: &[u8] = if name == b":authority" && !valid_authority(value) {
            b"localhost"
        } else {
            value
        };
        // Literal Header Field Never Indexed, new name (RFC 7541 §6.2.3).
        out.push(0x10);
        string(&mut out, name);
        string(&mut out, value);
    }
    out
}

/// A string literal, not Huffman-coded (RFC 7541 §5.2).
fn string(out: &mut Vec<u8>, s: &[u8]) {
    integer(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// An integer with an `n`-bit prefix after `first`'s high bits (§5.1).
fn integer(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | u8::try_from(value).unwrap_or(0));
        return;
    }
    out.push(first | u8::try_from(max).unwrap_or(0));
    value -= max;
    while value >= 128 {
        out.push(u8::try_from(value % 128).unwrap_or(0) | 0x80);
        value /= 128;
    }
    out.push(u8::try_from(value).unwrap_or(0));
}

/// Writes a header block as one HEADERS frame and as many CONTINUATION
/// frames as the default maximum frame size needs.
async fn write_headers<W: AsyncWrite + Unpin>(
    to: &mut W,
    end_stream: u8,
    stream: [u8; 4],
    priority: Option<[u8; 5]>,
    block: &[u8],
) -> io::Result<()> {
    let room = MAX_FRAME - if priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = block.split_at(block.len().min(room));
    let mut flags = end_stream | if priority.is_some() { PRIORITY } else { 0 };
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    let len = first.len() + if priority.is_some() { 5 } else { 0 };
    to.write_all(&frame_head(len, HEADERS, flags, stream))
        .await?;
    if let Some(p) = priority {
        to.write_all(&p).await?;
    }
    to.write_all(first).await?;
    while !rest.is_empty() {
        let (chunk, more) = rest.split_at(rest.len().min(MAX_FRAME));
        let flags = if more.is_empty() { END_HEADERS } else { 0 };
        to.write_all(&frame_head(chunk.len(), CONTINUATION, flags, stream))
            .await?;
        to.write_all(chunk).await?;
        rest = more;
    }
    Ok(())
}

fn frame_head(len: usize, kind: u8, flags: u8, stream: [u8; 4]) -> [u8; 9] {
    let l = u32::try_from(len).unwrap_or(0).to_be_bytes();
    [
        l[1], l[2], l[3], kind, flags, stream[0], stream[1], stream[2], stream[3],
    ]
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_encoded_decodes_to_the_same_fields_with_the_authority_fixed() {
        let fields = vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":authority".to_vec(), b"/run/spire/agent.sock".to_vec()),
            (
                b":path".to_vec(),
                b"/SpiffeWorkloadAPI/FetchX509SVID".to_vec(),
            ),
            (b"x-long".to_vec(), vec![b'a'; 300]),
        ];
        let encoded = encode(&fields);
        let decoded = loona_hpack::Decoder::new().decode(&encoded).unwrap();
        assert_eq!(decoded[1], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(decoded[0], fields[0]);
        assert_eq!(decoded[2..], fields[2..]);
        // A valid authority is kept.
        let ok = vec![(b":authority".to_vec(), b"localhost:8080".to_vec())];
        assert_eq!(
            loona_hpack::Decoder::new().decode(&encode(&ok)).unwrap(),
            ok
        );
    }

    #[test]
    fn padding_and_priority_are_taken_off_the_fragment() {
        let payload = [2u8, 0, 0, 0, 3, 16, 0xaa, 0xbb, 0, 0];
        let (priority, block) = headers_fragment(PADDED | PRIORITY, &payload).unwrap();
        assert_eq!(priority, Some([0, 0, 0, 3, 16]));
        assert_eq!(block, [0xaa, 0xbb]);
        assert!(headers_fragment(PADDED, &[9, 1]).is_err());
    }
}
