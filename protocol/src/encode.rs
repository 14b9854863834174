//! Outbound frame encoding. Methods go through `amq-protocol`'s generators; a content header is
//! encoded once per message and reused for every delivery; bodies are split to frame_max and large
//! slices are handed to the socket as shared `Bytes` (vectored write), never copied per consumer.

use std::collections::VecDeque;

use amq_protocol::{
    frame::{gen_frame, AMQPFrame, GenError, WriteContext},
    protocol::{basic::gen_properties, basic::AMQPProperties, gen_class, AMQPClass},
};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{FRAME_END, FRAME_OVERHEAD};

/// Body slices at least this long are written from the message's own buffer; shorter ones are
/// copied into the batch buffer, where a copy is cheaper than another iovec.
pub const SHARE_BODY_AT: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[error("frame encoding failed: {0}")]
pub struct EncodeError(String);

impl From<GenError> for EncodeError {
    fn from(e: GenError) -> Self {
        EncodeError(format!("{e:?}"))
    }
}

/// Appends one method frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, channel: u16, class: &AMQPClass) -> Result<(), EncodeError> {
    // The frame around the method is written here, the method by `amq-protocol` in place:
    // going through `AMQPFrame` would clone the method (and each of its strings) per frame.
    let start = out.len();
    out.push(1);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    let buf = std::mem::take(out);
    let (mut buf, _) = match gen_class(class)(WriteContext::from(buf)) {
        Ok(done) => done.into_inner(),
        Err(e) => return Err(e.into()),
    };
    let size = (buf.len() - start - 7) as u32;
    buf[start + 3..start + 7].copy_from_slice(&size.to_be_bytes());
    buf.push(FRAME_END);
    *out = buf;
    Ok(())
}

/// Appends any `amq-protocol` frame to `out`.
pub fn encode_any(out: &mut Vec<u8>, frame: &AMQPFrame) -> Result<(), EncodeError> {
    let buf = std::mem::take(out);
    let (buf, _) = gen_frame(frame)(WriteContext::from(buf))?.into_inner();
    *out = buf;
    Ok(())
}

/// Appends the 8-byte heartbeat frame.
pub fn encode_heartbeat(out: &mut Vec<u8>) {
    out.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// Encodes a content header payload (class, weight, body size, properties) once, for reuse.
pub fn content_header_payload(
    class_id: u16,
    body_size: u64,
    properties: &AMQPProperties,
) -> Result<Bytes, EncodeError> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&class_id.to_be_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&body_size.to_be_bytes());
    let (v, _) = gen_properties(properties)(WriteContext::from(v))?.into_inner();
    Ok(Bytes::from(v))
}

/// A batch of outbound frames, ready for one vectored write.
#[derive(Debug, Default)]
pub struct WriteBatch {
    cur: BytesMut,
    chunks: VecDeque<Bytes>,
    scratch: Vec<u8>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.cur.is_empty() && self.chunks.is_empty()
    }

    /// Bytes encoded into the batch's own buffer (frame headers, methods, small bodies; large
    /// bodies are referenced, not copied).
    pub fn encoded_len(&self) -> usize {
        self.cur.len()
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.cur.len() + self.chunks.iter().map(Bytes::len).sum::<usize>()
    }

    pub fn push_method(&mut self, channel: u16, class: &AMQPClass) -> Result<(), EncodeError> {
        self.scratch.clear();
        encode_frame(&mut self.scratch, channel, class)?;
        self.cur.extend_from_slice(&self.scratch);
        Ok(())
    }

    pub fn push_heartbeat(&mut self) {
        self.cur
            .extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, FRAME_END]);
    }

    /// A content header frame from an encoded payload, then the body split to `frame_max`.
    pub fn push_content(&mut self, channel: u16, header: &[u8], body: &Bytes, frame_max: usize) {
        put_frame_header(&mut self.cur, 2, channel, header.len());
        self.cur.extend_from_slice(header);
        self.cur.put_u8(FRAME_END);
        let max_payload = frame_max.saturating_sub(FRAME_OVERHEAD).max(1);
        let mut off = 0;
        while off < body.len() {
            let n = (body.len() - off).min(max_payload);
            put_frame_header(&mut self.cur, 3, channel, n);
            if n >= SHARE_BODY_AT {
                self.seal();
                self.chunks.push_back(body.slice(off..off + n));
            } else {
                self.cur.extend_from_slice(&body[off..off + n]);
            }
            self.cur.put_u8(FRAME_END);
            off += n;
        }
    }

    fn seal(&mut self) {
        if !self.cur.is_empty() {
            self.chunks.push_back(self.cur.split().freeze());
        }
    }

    /// Fills `dst` with the pending chunks, in order; returns how many were filled.
    pub fn io_slices<'a>(&'a mut self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        self.seal();
        let mut n = 0;
        for c in self.chunks.iter() {
            if n == dst.len() {
                break;
            }
            dst[n] = std::io::IoSlice::new(c);
            n += 1;
        }
        n
    }

    /// Drops `n` written bytes from the front.
    pub fn advance(&mut self, mut n: usize) {
        self.seal();
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

fn put_frame_header(out: &mut BytesMut, kind: u8, channel: u16, size: usize) {
    out.put_u8(kind);
    out.put_u16(channel);
    out.put_u32(size as u32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Decoder, Frame};

    /// A method frame written in place is the frame `amq-protocol` writes, appended after
    /// what the buffer already holds.
    #[test]
    fn method_frames_match_amq_protocol() {
        use amq_protocol::protocol::basic;
        let deliver = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: "ctag-1".into(),
            delivery_tag: 77,
            redelivered: true,
            exchange: "amq.topic".into(),
            routing_key: "a.b.c".into(),
        }));
        let mut ours = vec![9, 9];
        encode_frame(&mut ours, 513, &deliver).unwrap();
        let mut theirs = vec![9, 9];
        encode_any(&mut theirs, &AMQPFrame::Method(513, deliver)).unwrap();
        assert_eq!(ours, theirs);
    }

    fn drain(batch: &mut WriteBatch) -> BytesMut {
        let mut out = BytesMut::new();
        loop {
            let mut slices = [std::io::IoSlice::new(&[]); 8];
            let n = batch.io_slices(&mut slices);
            if n == 0 {
                break;
            }
            let total: usize = slices[..n].iter().map(|s| s.len()).sum();
            for s in &slices[..n] {
                out.extend_from_slice(s);
            }
            batch.advance(total);
        }
        out
    }

    #[test]
    fn body_is_split_to_frame_max() {
        let props = AMQPProperties::default().with_delivery_mode(2);
        let header = content_header_payload(60, 20000, &props).unwrap();
        let body = Bytes::from(vec![5u8; 20000]);
        let mut batch = WriteBatch::new();
        batch.push_content(7, &header, &body, 8192);
        let mut wire = drain(&mut batch);
        let d = Decoder::new(8192);
        match d.decode(&mut wire).unwrap() {
            Some(Frame::Header {
                channel: 7,
                body_size: 20000,
                properties,
                ..
            }) => {
                assert_eq!(properties.delivery_mode(), &Some(2))
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut sizes = vec![];
        while let Some(f) = d.decode(&mut wire).unwrap() {
            match f {
                Frame::Body {
                    channel: 7,
                    payload,
                } => {
                    assert!(payload.iter().all(|b| *b == 5));
                    sizes.push(payload.len())
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(sizes, vec![8184, 8184, 20000 - 2 * 8184]);
    }

    #[test]
    fn empty_body_sends_header_only() {
        let header = content_header_payload(60, 0, &AMQPProperties::default()).unwrap();
        let mut batch = WriteBatch::new();
        batch.push_content(1, &header, &Bytes::new(), 131072);
        let mut wire = drain(&mut batch);
        let d = Decoder::new(131072);
        assert!(matches!(
            d.decode(&mut wire),
            Ok(Some(Frame::Header { body_size: 0, .. }))
        ));
        assert!(wire.is_empty());
    }

    #[test]
    fn partial_advance_keeps_order() {
        let header = content_header_payload(60, 10000, &AMQPProperties::default()).unwrap();
        let body = Bytes::from((0..10000u32).map(|i| i as u8).collect::<Vec<_>>());
        let mut batch = WriteBatch::new();
        batch.push_heartbeat();
        batch.push_content(1, &header, &body, 131072);
        batch.push_heartbeat();
        let total = batch.len();
        let mut out = BytesMut::new();
        // write in odd-sized pieces
        while !batch.is_empty() {
            let mut slices = [std::io::IoSlice::new(&[]); 4];
            let n = batch.io_slices(&mut slices);
            let first = &slices[..n][0];
            let take = first.len().min(333);
            out.extend_from_slice(&first[..take]);
            batch.advance(take);
        }
        assert_eq!(out.len(), total);
        let d = Decoder::new(131072);
        assert!(matches!(
            d.decode(&mut out),
            Ok(Some(Frame::Heartbeat { .. }))
        ));
        assert!(matches!(d.decode(&mut out), Ok(Some(Frame::Header { .. }))));
        match d.decode(&mut out) {
            Ok(Some(Frame::Body { payload, .. })) => assert_eq!(payload, body),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            d.decode(&mut out),
            Ok(Some(Frame::Heartbeat { .. }))
        ));
    }
}
