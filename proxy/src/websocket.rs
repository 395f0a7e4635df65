//! WebSockets (RFC 6455) through the sidecar. The handshake is an ordinary
//! request on the request path (routed, checked, credential injected on
//! it, counted); once the upstream has answered `101`, the two upgraded
//! connections are relayed here, frame boundaries tracked in both
//! directions so that the sidecar can speak for itself:
//!
//! - a frame from the workload larger than the limit ends the connection
//!   with close code 1009 (message too big) and the upstream is closed;
//! - a revocation that covers the connection's credential (the credential
//!   itself, the grant, the workload or the upstream) ends it with close
//!   code 1008 (policy violation): the in-flight cut of the containment
//!   promise, signalled before the revocation is acknowledged like every
//!   other stream's cut.
//!
//! Frames are relayed as they are (masking, fragmentation, extensions such
//! as permessage-deflate are the two ends' business); only their headers
//! are read.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

/// Close codes the sidecar sends (RFC 6455 §7.4.1).
pub const CLOSE_POLICY_VIOLATION: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// Where a direction of the stream is: inside a frame's header, or in its
/// payload with so many bytes to go.
#[derive(Debug, Default)]
pub struct FrameTracker {
    header: [u8; 14],
    have: usize,
    payload_left: u64,
}

impl FrameTracker {
    /// Feeds bytes as they pass; returns the payload length of the first
    /// frame header completed in them that is over `limit`, if any.
    pub fn feed(&mut self, mut bytes: &[u8], limit: u64) -> Option<u64> {
        let mut over = None;
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.payload_left -= skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if let Some((len, header_len)) = self.complete() {
                debug_assert_eq!(header_len, self.have);
                self.have = 0;
                self.payload_left = len;
                if len > limit && over.is_none() {
                    over = Some(len);
                }
            }
        }
        over
    }

    /// The payload length and header length once the header is complete.
    fn complete(&self) -> Option<(u64, usize)> {
        let h = &self.header[..self.have];
        if h.len() < 2 {
            return None;
        }
        let masked = h[1] & 0x80 != 0;
        let mask_len = if masked { 4 } else { 0 };
        let (len, ext) = match h[1] & 0x7f {
            126 => (None, 2),
            127 => (None, 8),
            n => (Some(u64::from(n)), 0),
        };
        let header_len = 2 + ext + mask_len;
        if h.len() < header_len {
            return None;
        }
        let len = len.unwrap_or_else(|| {
            h[2..2 + ext]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        });
        Some((len, header_len))
    }

    /// Between frames: a frame the sidecar writes now would not split one.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }
}

/// A close frame as a server sends it (unmasked), with a short reason.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    // Control frames carry at most 125 bytes of payload.
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut frame = Vec::with_capacity(4 + reason.len());
    frame.push(0x88);
    frame.push(u8::try_from(2 + reason.len()).unwrap_or(125));
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    frame
}

/// `frame` (a close frame as built by [`close_frame`]) as a client sends
/// it: masked with a random key (RFC 6455 §5.3).
fn masked(frame: &[u8]) -> Vec<u8> {
    use ring::rand::SecureRandom as _;
    let mut key = [0u8; 4];
    let _ = ring::rand::SystemRandom::new().fill(&mut key);
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.push(frame[0]);
    out.push(frame[1] | 0x80);
    out.extend_from_slice(&key);
    out.extend(
        frame[2..]
            .iter()
            .zip(key.iter().cycle())
            .map(|(b, k)| b ^ k),
    );
    out
}

/// Why a relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// One side closed (or failed).
    Closed,
    /// A revocation covered the connection: 1008 sent (or the connection
    /// dropped, when the upstream was mid-frame).
    Revoked,
    /// A workload frame over the limit: 1009 sent.
    TooBig(u64),
    /// The sidecar is stopping: 1001 sent.
    Stopping,
}

/// Relays an upgraded WebSocket connection until it ends (see the module's
/// comment). `revoked` is the credential's token; `stop` the sidecar's.
pub async fn relay<W, U>(
    workload: W,
    upstream: U,
    revoked: CancellationToken,
    max_frame_bytes: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Ended
where
    W: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut w_read, mut w_write) = tokio::io::split(workload);
    let (mut u_read, mut u_write) = tokio::io::split(upstream);
    let mut from_workload = FrameTracker::default();
    let mut to_workload = FrameTracker::default();
    let mut w_buf = vec![0u8; 16 * 1024];
    let mut u_buf = vec![0u8; 16 * 1024];
    // Whether what the upstream has been sent ends at a frame boundary.
    let mut upstream_at_boundary = true;
    let (code, ended, reason) = loop {
        tokio::select! {
            read = w_read.read(&mut w_buf) => {
                let n = match read {
                    Ok(0) | Err(_) => {
                        let _ = u_write.shutdown().await;
                        return Ended::Closed;
                    }
                    Ok(n) => n,
                };
                upstream_at_boundary = from_workload.at_boundary();
                if let Some(len) = from_workload.feed(&w_buf[..n], max_frame_bytes) {
                    // Nothing of this read was sent on.
                    break (
                        CLOSE_TOO_BIG,
                        Ended::TooBig(len),
                        format!("frame of {len} bytes over the sidecar's limit of {max_frame_bytes}"),
                    );
                }
                if u_write.write_all(&w_buf[..n]).await.is_err() {
                    let _ = w_write.shutdown().await;
                    return Ended::Closed;
                }
                upstream_at_boundary = from_workload.at_boundary();
            }
            read = u_read.read(&mut u_buf) => {
                let n = match read {
                    Ok(0) | Err(_) => {
                        let _ = w_write.shutdown().await;
                        return Ended::Closed;
                    }
                    Ok(n) => n,
                };
                // Upstream frames are not limited, only followed.
                to_workload.feed(&u_buf[..n], u64::MAX);
                if w_write.write_all(&u_buf[..n]).await.is_err() {
                    let _ = u_write.shutdown().await;
                    return Ended::Closed;
                }
            }
            () = revoked.cancelled() => {
                break (
                    CLOSE_POLICY_VIOLATION,
                    Ended::Revoked,
                    "leash: revoked".to_owned(),
                );
            }
            () = leash_api::process::stopped(&mut stop) => {
                break (CLOSE_GOING_AWAY, Ended::Stopping, "leash: stopping".to_owned());
            }
        }
    };
    // The upstream is closed either way: nothing more goes to it. It is
    // told why when that would not split a frame (as a client: masked).
    if upstream_at_boundary {
        let _ = u_write
            .write_all(&masked(&close_frame(CLOSE_GOING_AWAY, &reason)))
            .await;
    }
    let _ = u_write.shutdown().await;
    drop(u_read);
    if to_workload.at_boundary() {
        let _ = w_write.write_all(&close_frame(code, &reason)).await;
        let _ = w_write.shutdown().await;
    }
    // Mid-frame, a close frame would corrupt the stream: the connection is
    // dropped instead.
    ended
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64 (RFC 6455 §4.1).
pub fn new_key() -> String {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut nonce = [0u8; 16];
    let _ = ring::rand::SystemRandom::new().fill(&mut nonce);
    base64::engine::general_purpose::STANDARD.encode(nonce)
}

/// The `Sec-WebSocket-Accept` value for a key (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    use base64::Engine as _;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_lengths_are_read_in_every_form_and_split_anywhere() {
        let mut frames = Vec::new();
        // Masked 5-byte text, a 300-byte binary (16-bit length), a 70,000
        // byte one (64-bit length), unmasked.
        frames.extend_from_slice(&[0x81, 0x85, 1, 2, 3, 4]);
        frames.extend_from_slice(&[0; 5]);
        frames.extend_from_slice(&[0x82, 126, 0x01, 0x2c]);
        frames.extend_from_slice(&[0; 300]);
        frames.extend_from_slice(&[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        frames.extend_from_slice(&vec![0; 70_000]);
        for split in [1, 2, 3, 7, 64, 4096, frames.len()] {
            let mut t = FrameTracker::default();
            let mut over = Vec::new();
            for chunk in frames.chunks(split) {
                if let Some(len) = t.feed(chunk, 1_000) {
                    over.push(len);
                }
            }
            assert_eq!(over, [70_000], "split {split}");
            assert!(t.at_boundary(), "split {split}");
        }
        let mut t = FrameTracker::default();
        t.feed(&frames[..3], u64::MAX);
        assert!(!t.at_boundary());
    }

    #[test]
    fn a_masked_close_unmasks_to_the_same_frame() {
        let frame = close_frame(1001, "bye");
        let m = masked(&frame);
        assert_eq!(m[0], 0x88);
        assert_eq!(m[1], 0x80 | 5);
        let key = &m[2..6];
        let payload: Vec<u8> = m[6..]
            .iter()
            .zip(key.iter().cycle())
            .map(|(b, k)| b ^ k)
            .collect();
        assert_eq!(payload, frame[2..]);
        let mut t = FrameTracker::default();
        assert_eq!(t.feed(&m, 10), None);
        assert!(t.at_boundary());
    }

    #[test]
    fn close_frames_and_accept_keys_follow_the_rfc() {
        assert_eq!(close_frame(1008, "x"), [0x88, 3, 0x03, 0xf0, b'x']);
        assert!(close_frame(1009, &"y".repeat(500)).len() <= 127);
        // RFC 6455 §1.3's example.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
