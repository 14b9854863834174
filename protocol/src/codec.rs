//! Inbound frame decoding: the protocol header check, a frame-size check on the 7-byte frame
//! header before any payload is buffered, method and content-header parsing through
//! `amq-protocol`, and body frames handed out as `Bytes` split off the read buffer (no copy).

use amq_protocol::{
    frame::parsing::parse_content_header,
    protocol::{basic::AMQPProperties, parse_class, AMQPClass},
};
use bytes::{Buf, Bytes, BytesMut};
use std::cell::RefCell;

use crate::{reply, FRAME_END, FRAME_OVERHEAD, PROTOCOL_HEADER};

/// Method and content-header frames are not bound by frame_max (RabbitMQ does not apply it to
/// them), but they are bounded: a peer cannot make us buffer more than this for one of them.
pub const MAX_NON_BODY_FRAME: usize = 4 * 1024 * 1024;
/// Until connection.tune-ok sets frame_max, every frame (with its framing) is bounded by this,
/// as in RabbitMQ (its pre-tune frame_max is 4096): an unauthenticated peer cannot make us
/// buffer megabytes.
pub const PRE_TUNE_FRAME_MAX: usize = 4096;

/// One decoded inbound frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A method. `head` holds the first bytes of its payload, for the few checks
    /// `amq-protocol` parses away (basic.qos prefetch_size).
    Method {
        channel: u16,
        class: AMQPClass,
        head: MethodHead,
    },
    /// A content header. `raw` is its payload, reusable as is for every delivery.
    Header {
        channel: u16,
        class_id: u16,
        body_size: u64,
        /// Boxed: the properties are most of a header's size, and every `Frame` is as large
        /// as its largest variant and moved through several calls.
        properties: Box<AMQPProperties>,
        raw: Bytes,
    },
    /// A content body frame, sliced out of the read buffer.
    Body {
        channel: u16,
        payload: Bytes,
    },
    Heartbeat {
        channel: u16,
    },
    /// A content body frame whose `len` bytes of payload the reader wrote straight to the end
    /// of `body`, the buffer its channel's assembler lent it (`Assembler::take_body_buffer`).
    BodyInPlace {
        channel: u16,
        body: bytes::BytesMut,
        len: usize,
    },
}

/// The first 8 bytes of a method frame's payload (zeros past its end): class id, method id
/// and, for basic.qos, prefetch_size. Kept instead of the payload itself so that a `Frame`
/// stays within 128 bytes, the size the compiler still moves inline: a frame is moved through
/// five calls on its way to a channel, and larger moves go through `memcpy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MethodHead([u8; 8]);

impl MethodHead {
    pub fn of(payload: &[u8]) -> Self {
        let mut h = [0u8; 8];
        let n = payload.len().min(8);
        h[..n].copy_from_slice(&payload[..n]);
        MethodHead(h)
    }

    /// (class id, method id).
    pub fn ids(&self) -> (u16, u16) {
        method_ids(&self.0)
    }

    /// basic.qos's prefetch_size, which `amq-protocol` parses away.
    pub fn qos_prefetch_size(&self) -> u32 {
        qos_prefetch_size(&self.0)
    }

    pub fn bytes(&self) -> &[u8; 8] {
        &self.0
    }
}

impl Frame {
    pub fn channel(&self) -> u16 {
        match self {
            Frame::Method { channel, .. }
            | Frame::Header { channel, .. }
            | Frame::Body { channel, .. }
            | Frame::BodyInPlace { channel, .. }
            | Frame::Heartbeat { channel } => *channel,
        }
    }
}

/// Why a frame could not be decoded. Every variant is a connection error; [`DecodeError::code`]
/// gives its reply code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// `size` is the payload size, `max` the largest payload allowed (frame_max - 8).
    #[error("type {kind}, all octets = <<>>: {{frame_too_large,{size},{max}}}")]
    FrameTooLarge { kind: u8, size: usize, max: usize },
    #[error("{{invalid_frame_end_marker,{0}}}")]
    BadFrameEnd(u8),
    #[error("type {0}, all octets = <<>>: unknown_frame")]
    UnknownFrameType(u8),
    #[error("malformed method frame on channel {channel} (class {class_id}, method {method_id})")]
    MalformedMethod {
        channel: u16,
        class_id: u16,
        method_id: u16,
    },
    #[error("unknown method (class {class_id}, method {method_id})")]
    UnknownMethod { class_id: u16, method_id: u16 },
    #[error("malformed content header on channel {0}")]
    MalformedHeader(u16),
}

impl DecodeError {
    pub fn code(&self) -> u16 {
        match self {
            DecodeError::FrameTooLarge { .. }
            | DecodeError::BadFrameEnd(_)
            | DecodeError::UnknownFrameType(_)
            | DecodeError::MalformedHeader(_) => reply::FRAME_ERROR,
            DecodeError::MalformedMethod { .. } => reply::SYNTAX_ERROR,
            DecodeError::UnknownMethod { .. } => reply::NOT_IMPLEMENTED,
        }
    }

    /// Class and method ids to report in connection.close, when known.
    pub fn method_ids(&self) -> (u16, u16) {
        match self {
            DecodeError::MalformedMethod {
                class_id,
                method_id,
                ..
            }
            | DecodeError::UnknownMethod {
                class_id,
                method_id,
            } => (*class_id, *method_id),
            _ => (0, 0),
        }
    }
}

/// Outcome of checking the 8 bytes a client opens with.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderCheck {
    /// Fewer than 8 bytes so far.
    Incomplete,
    /// `AMQP\0\0\x09\x01`.
    Amqp091,
    /// Anything else: answer [`PROTOCOL_HEADER`] and close.
    Wrong,
}

/// Checks (and on success consumes) the protocol header at the front of `buf`.
pub fn check_protocol_header(buf: &mut BytesMut) -> HeaderCheck {
    if buf.len() < PROTOCOL_HEADER.len() {
        // A prefix that already differs is wrong without waiting for the rest.
        let n = buf.len();
        if buf[..] != PROTOCOL_HEADER[..n] {
            return HeaderCheck::Wrong;
        }
        return HeaderCheck::Incomplete;
    }
    if buf[..8] == PROTOCOL_HEADER {
        buf.advance(8);
        HeaderCheck::Amqp091
    } else {
        HeaderCheck::Wrong
    }
}

/// Decodes frames from a read buffer. `frame_max` is the negotiated maximum frame size,
/// including the 8 bytes of framing, applied to body frames before their payload is buffered.
#[derive(Debug, Clone)]
pub struct Decoder {
    frame_max: usize,
    /// frame_max was negotiated; before that every frame is bounded by `PRE_TUNE_FRAME_MAX`.
    tuned: bool,
    /// The last basic.publish decoded, with its payload. A publisher mostly repeats one method
    /// (same exchange, routing key and flags), and `amq-protocol`'s parser allocates a name for
    /// each flag bit: a byte-identical payload gets a clone of the decoded method instead.
    last_publish: RefCell<Option<(Vec<u8>, AMQPClass)>>,
}

impl Decoder {
    /// A decoder for frames up to `frame_max` (0: no limit on body frames).
    pub fn new(frame_max: u32) -> Self {
        Decoder {
            frame_max: frame_max_or_unlimited(frame_max),
            tuned: true,
            last_publish: RefCell::new(None),
        }
    }

    /// A server's decoder before connection.tune-ok: every frame at most `PRE_TUNE_FRAME_MAX`.
    pub fn before_tune() -> Self {
        Decoder {
            frame_max: PRE_TUNE_FRAME_MAX,
            tuned: false,
            last_publish: RefCell::new(None),
        }
    }

    /// The negotiated frame_max (connection.tune-ok).
    pub fn set_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max_or_unlimited(frame_max);
        self.tuned = true;
    }

    /// Bytes the next frame needs in the buffer, if the buffer holds its header. Lets a reader
    /// reserve exactly once for a large body frame.
    pub fn needed(&self, buf: &[u8]) -> Option<usize> {
        if buf.len() < 7 {
            return None;
        }
        let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
        Some(size + FRAME_OVERHEAD)
    }

    /// The channel and payload size of the body frame whose header starts `buf`, if one does
    /// and its size is within frame_max.
    pub fn body_frame_header(&self, buf: &[u8]) -> Option<(u16, usize)> {
        if buf.len() < 7 || buf[0] != 3 {
            return None;
        }
        let channel = u16::from_be_bytes([buf[1], buf[2]]);
        let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
        let limit = self.limit(3).ok()?;
        (size.saturating_add(FRAME_OVERHEAD) <= limit).then_some((channel, size))
    }

    /// The largest frame (with its overhead) of type `kind` allowed now.
    fn limit(&self, kind: u8) -> Result<usize, DecodeError> {
        Ok(match kind {
            1 | 2 | 3 | 8 if !self.tuned => PRE_TUNE_FRAME_MAX,
            3 => self.frame_max,
            1 | 2 | 8 => self.frame_max.max(MAX_NON_BODY_FRAME),
            other => return Err(DecodeError::UnknownFrameType(other)),
        })
    }

    /// Takes one complete frame off the front of `buf`, `Ok(None)` if more bytes are needed.
    /// The size is checked as soon as the 7-byte header is in, so an oversized frame is refused
    /// before its payload is read.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if buf.len() < 7 {
            return Ok(None);
        }
        let kind = buf[0];
        let channel = u16::from_be_bytes([buf[1], buf[2]]);
        let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
        let limit = self.limit(kind)?;
        if size.saturating_add(FRAME_OVERHEAD) > limit {
            return Err(DecodeError::FrameTooLarge {
                kind,
                size,
                max: limit.saturating_sub(FRAME_OVERHEAD),
            });
        }
        if buf.len() < size + FRAME_OVERHEAD {
            return Ok(None);
        }
        let end = buf[7 + size];
        if end != FRAME_END {
            return Err(DecodeError::BadFrameEnd(end));
        }
        if kind == 1 {
            // Parsed where it lies: nothing of a method outlives its parse but `head`.
            let frame = self.decode_method(channel, &buf[7..7 + size]);
            buf.advance(size + FRAME_OVERHEAD);
            return frame.map(Some);
        }
        buf.advance(7);
        let payload = buf.split_to(size).freeze();
        buf.advance(1);
        let frame = match kind {
            2 => decode_header(channel, payload)?,
            3 => Frame::Body { channel, payload },
            _ => Frame::Heartbeat { channel },
        };
        Ok(Some(frame))
    }

    /// A method frame, through the last-publish memo for basic.publish.
    fn decode_method(&self, channel: u16, raw: &[u8]) -> Result<Frame, DecodeError> {
        if method_ids(raw) != PUBLISH {
            return decode_method(channel, raw);
        }
        if let Some((bytes, class)) = self.last_publish.borrow().as_ref() {
            if crate::same_bytes(bytes, raw) {
                return Ok(Frame::Method {
                    channel,
                    class: class.clone(),
                    head: MethodHead::of(raw),
                });
            }
        }
        let frame = decode_method(channel, raw)?;
        if let Frame::Method { class, .. } = &frame {
            let mut memo = self.last_publish.borrow_mut();
            match memo.as_mut() {
                // The memo's buffer is reused: a publisher that varies its routing key pays a
                // copy of the payload and a clone of the method per publish, no new buffer.
                Some((bytes, last)) => {
                    bytes.clear();
                    bytes.extend_from_slice(raw);
                    *last = class.clone();
                }
                None => *memo = Some((raw.to_vec(), class.clone())),
            }
        }
        Ok(frame)
    }
}

/// basic.publish's (class id, method id).
const PUBLISH: (u16, u16) = (60, 40);

fn frame_max_or_unlimited(frame_max: u32) -> usize {
    if frame_max == 0 {
        usize::MAX
    } else {
        frame_max as usize
    }
}

/// (class id, method id) of a method frame's payload.
pub fn method_ids(raw: &[u8]) -> (u16, u16) {
    if raw.len() >= 4 {
        (
            u16::from_be_bytes([raw[0], raw[1]]),
            u16::from_be_bytes([raw[2], raw[3]]),
        )
    } else {
        (0, 0)
    }
}

fn decode_method(channel: u16, raw: &[u8]) -> Result<Frame, DecodeError> {
    match parse_class(raw) {
        Ok((_, class)) => Ok(Frame::Method {
            channel,
            class,
            head: MethodHead::of(raw),
        }),
        Err(_) => {
            let (class_id, method_id) = method_ids(raw);
            if raw.len() >= 4 && !is_known_method(class_id, method_id) {
                Err(DecodeError::UnknownMethod {
                    class_id,
                    method_id,
                })
            } else {
                Err(DecodeError::MalformedMethod {
                    channel,
                    class_id,
                    method_id,
                })
            }
        }
    }
}

fn is_known_method(class_id: u16, method_id: u16) -> bool {
    match class_id {
        10 => matches!(
            method_id,
            10 | 11 | 20 | 21 | 30 | 31 | 40 | 41 | 50 | 51 | 60 | 61 | 70 | 71
        ),
        20 => matches!(method_id, 10 | 11 | 20 | 21 | 40 | 41),
        30 => matches!(method_id, 10 | 11),
        40 => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31 | 40 | 51),
        50 => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31 | 40 | 41 | 50 | 51),
        60 => matches!(
            method_id,
            10 | 11
                | 20
                | 21
                | 30
                | 31
                | 40
                | 50
                | 60
                | 70
                | 71
                | 72
                | 80
                | 90
                | 100
                | 110
                | 111
                | 120
        ),
        85 => matches!(method_id, 10 | 11),
        90 => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31),
        _ => false,
    }
}

fn decode_header(channel: u16, raw: Bytes) -> Result<Frame, DecodeError> {
    match parse_content_header(&raw[..]) {
        Ok((_, h)) => Ok(Frame::Header {
            channel,
            class_id: h.class_id,
            body_size: h.body_size,
            properties: Box::new(h.properties),
            raw,
        }),
        Err(_) => Err(DecodeError::MalformedHeader(channel)),
    }
}

/// basic.qos's prefetch_size, which `amq-protocol` parses away. `raw` is the method payload.
pub fn qos_prefetch_size(raw: &[u8]) -> u32 {
    if raw.len() >= 8 {
        u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]])
    } else {
        0
    }
}

/// The properties of an encoded content header payload (as `Frame::Header::raw` holds it), for
/// messages read back from the store. None if it does not parse.
pub fn header_properties(raw: &[u8]) -> Option<AMQPProperties> {
    parse_content_header(raw).ok().map(|(_, h)| h.properties)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::{encode_frame, encode_heartbeat};
    use amq_protocol::protocol::{basic, queue};

    fn method_bytes(channel: u16, class: &AMQPClass) -> BytesMut {
        let mut v = Vec::new();
        encode_frame(&mut v, channel, class).unwrap();
        BytesMut::from(&v[..])
    }

    /// The last-publish memo answers only a byte-identical payload: any difference in
    /// exchange, routing key or flags is parsed afresh, and other methods pass through.
    #[test]
    fn repeated_publishes_decode_as_their_bytes_say() {
        let publish = |exchange: &str, key: &str, mandatory: bool| {
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: exchange.into(),
                routing_key: key.into(),
                mandatory,
                immediate: false,
            }))
        };
        let d = Decoder::new(0);
        let cases = [
            publish("", "a", false),
            publish("", "a", false),
            publish("", "b", false),
            publish("", "b", true),
            publish("x", "b", true),
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 5,
                global: false,
            })),
            publish("x", "b", true),
            publish("", "a", false),
        ];
        for (i, c) in cases.iter().enumerate() {
            let mut b = method_bytes(i as u16, c);
            match d.decode(&mut b).unwrap() {
                Some(Frame::Method { channel, class, .. }) => {
                    assert_eq!(channel, i as u16);
                    assert_eq!(&class, c, "case {i}");
                }
                other => panic!("{other:?}"),
            }
            assert!(b.is_empty());
        }
    }

    #[test]
    fn protocol_header() {
        let mut b = BytesMut::from(&b"AMQP\x00\x00\x09\x01rest"[..]);
        assert_eq!(check_protocol_header(&mut b), HeaderCheck::Amqp091);
        assert_eq!(&b[..], b"rest");
        let mut b = BytesMut::from(&b"AMQP\x01\x01\x00\x0a"[..]);
        assert_eq!(check_protocol_header(&mut b), HeaderCheck::Wrong);
        let mut b = BytesMut::from(&b"AMQ"[..]);
        assert_eq!(check_protocol_header(&mut b), HeaderCheck::Incomplete);
        let mut b = BytesMut::from(&b"GET "[..]);
        assert_eq!(check_protocol_header(&mut b), HeaderCheck::Wrong);
    }

    #[test]
    fn method_roundtrip_and_partial() {
        let class = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "q".into(),
            durable: true,
            ..Default::default()
        }));
        let full = method_bytes(3, &class);
        let d = Decoder::new(131072);
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert!(d.decode(&mut part).unwrap().is_none(), "cut at {cut}");
        }
        let mut b = full.clone();
        b.extend_from_slice(&full);
        for _ in 0..2 {
            match d.decode(&mut b).unwrap() {
                Some(Frame::Method {
                    channel: 3,
                    class: c,
                    ..
                }) => assert_eq!(c, class),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(b.is_empty());
    }

    #[test]
    fn oversized_body_refused_from_header_alone() {
        let d = Decoder::new(8192);
        // Only the 7-byte header of a body frame declaring 1 MiB.
        let mut b = BytesMut::from(&[3u8, 0, 1, 0, 0x10, 0, 0][..]);
        assert_eq!(
            d.decode(&mut b),
            Err(DecodeError::FrameTooLarge {
                kind: 3,
                size: 0x100000,
                max: 8184
            })
        );
        let e = DecodeError::FrameTooLarge {
            kind: 3,
            size: 200000,
            max: 131064,
        };
        assert_eq!(e.code(), reply::FRAME_ERROR);
        assert_eq!(
            e.to_string(),
            "type 3, all octets = <<>>: {frame_too_large,200000,131064}"
        );
    }

    /// What a reader may read in place: a body frame's header within frame_max, nothing else.
    #[test]
    fn body_frame_headers_for_in_place_reads() {
        let d = Decoder::new(8192);
        let header = |kind: u8, size: u32| {
            let mut h = vec![kind, 0, 5];
            h.extend_from_slice(&size.to_be_bytes());
            h
        };
        assert_eq!(d.body_frame_header(&header(3, 8184)), Some((5, 8184)));
        assert_eq!(
            d.body_frame_header(&header(3, 8185)),
            None,
            "over frame_max"
        );
        assert_eq!(d.body_frame_header(&header(1, 100)), None, "a method");
        assert_eq!(d.body_frame_header(&header(3, 100)[..6]), None, "short");
        let untuned = Decoder::before_tune();
        assert_eq!(untuned.body_frame_header(&header(3, 8000)), None);
    }

    #[test]
    fn body_at_exact_limit_is_accepted() {
        let d = Decoder::new(8192);
        let mut b = BytesMut::new();
        b.extend_from_slice(&[3, 0, 1]);
        b.extend_from_slice(&(8192u32 - 8).to_be_bytes());
        b.extend_from_slice(&vec![7u8; 8184]);
        b.extend_from_slice(&[FRAME_END]);
        match d.decode(&mut b).unwrap() {
            Some(Frame::Body {
                channel: 1,
                payload,
            }) => assert_eq!(payload.len(), 8184),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bad_frame_end_and_type() {
        let d = Decoder::new(131072);
        let mut b = BytesMut::from(&[8u8, 0, 0, 0, 0, 0, 0, 0xCD][..]);
        assert_eq!(d.decode(&mut b), Err(DecodeError::BadFrameEnd(0xCD)));
        let mut b = BytesMut::from(&[9u8, 0, 0, 0, 0, 0, 0, 0xCE][..]);
        assert_eq!(d.decode(&mut b), Err(DecodeError::UnknownFrameType(9)));
    }

    #[test]
    fn heartbeat() {
        let d = Decoder::new(131072);
        let mut v = Vec::new();
        encode_heartbeat(&mut v);
        assert_eq!(v, [8, 0, 0, 0, 0, 0, 0, 0xCE]);
        let mut b = BytesMut::from(&v[..]);
        assert!(matches!(
            d.decode(&mut b),
            Ok(Some(Frame::Heartbeat { channel: 0 }))
        ));
    }

    #[test]
    fn unknown_and_malformed_methods() {
        let d = Decoder::new(131072);
        // class 60 method 99 does not exist
        let mut b = BytesMut::from(&[1u8, 0, 1, 0, 0, 0, 4, 0, 60, 0, 99, 0xCE][..]);
        assert_eq!(
            d.decode(&mut b),
            Err(DecodeError::UnknownMethod {
                class_id: 60,
                method_id: 99
            })
        );
        // basic.qos truncated
        let mut b = BytesMut::from(&[1u8, 0, 1, 0, 0, 0, 5, 0, 60, 0, 10, 0, 0xCE][..]);
        assert!(matches!(
            d.decode(&mut b),
            Err(DecodeError::MalformedMethod { .. })
        ));
    }

    #[test]
    fn a_frame_is_moved_inline() {
        // Moves of more than 128 bytes are `memcpy` calls (see `MethodHead`).
        assert!(
            std::mem::size_of::<Frame>() <= 128,
            "{}",
            std::mem::size_of::<Frame>()
        );
    }

    #[test]
    fn qos_prefetch_size_is_read() {
        let class = AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 5,
            global: false,
        }));
        let mut b = method_bytes(1, &class);
        // patch prefetch_size (bytes 4..8 of the payload, payload starts at 7)
        b[7 + 4..7 + 8].copy_from_slice(&10u32.to_be_bytes());
        let d = Decoder::new(131072);
        match d.decode(&mut b).unwrap() {
            Some(Frame::Method { head, .. }) => assert_eq!(head.qos_prefetch_size(), 10),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn frames_before_tune_are_bounded_by_4096() {
        let d = Decoder::before_tune();
        // A method frame declaring 4 MiB - 8: allowed once tuned, refused before.
        let mut buf = BytesMut::from(&[1u8, 0, 0, 0, 0x3f, 0xff, 0xf8][..]);
        assert!(matches!(
            d.decode(&mut buf),
            Err(DecodeError::FrameTooLarge { max: 4088, .. })
        ));
        let mut buf = BytesMut::from(&[1u8, 0, 0, 0, 0x3f, 0xff, 0xf8][..]);
        assert!(matches!(Decoder::new(131072).decode(&mut buf), Ok(None)));
        let mut tuned = Decoder::before_tune();
        tuned.set_frame_max(131072);
        let mut buf = BytesMut::from(&[1u8, 0, 0, 0, 0x3f, 0xff, 0xf8][..]);
        assert!(matches!(tuned.decode(&mut buf), Ok(None)));
        // 4088 bytes of payload is the largest accepted before tune.
        let mut buf = BytesMut::from(&[1u8, 0, 0, 0, 0x0f, 0xf8][..]);
        buf.extend_from_slice(&[0; 1][..]);
        buf[3..7].copy_from_slice(&4088u32.to_be_bytes());
        assert!(matches!(d.decode(&mut buf), Ok(None)));
    }
}
