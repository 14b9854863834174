//! Content assembly for one channel: a content-bearing method (basic.publish), then its content
//! header, then body frames until the declared size. Headers and bodies of up to `OWN_BELOW`
//! bytes are copied out of the read buffer: a small slice kept in a queue would hold the whole
//! buffer it came from. Larger bodies of one frame are kept as the `Bytes` sliced from the read
//! buffer; a body over the size limit is refused from its header and its frames are discarded
//! as they arrive, never buffered.

use amq_protocol::protocol::{basic::AMQPProperties, basic::Publish};
use bytes::{Bytes, BytesMut};

use crate::{reply, CLASS_BASIC};

/// Headers and one-frame bodies shorter than this get their own allocation.
pub const OWN_BELOW: usize = 4096;

/// `b` in its own allocation if it is small, else the slice as is.
fn own(b: Bytes) -> Bytes {
    if b.len() < OWN_BELOW {
        Bytes::copy_from_slice(&b)
    } else {
        b
    }
}

/// A complete published message as it came off the wire.
#[derive(Debug, Clone)]
pub struct Content {
    pub publish: Publish,
    /// Boxed, as the decoder made them: they are most of a message's size and are only read.
    pub properties: Box<AMQPProperties>,
    /// The raw content header payload, reusable for deliveries.
    pub header: Bytes,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContentError {
    /// A frame arrived that the assembly state does not allow (505, a connection error).
    #[error("{0}")]
    Unexpected(String),
    /// The header declares more than the broker accepts (406, a channel error).
    #[error("message size {size} is larger than configured max size {max}")]
    TooLarge { size: u64, max: u64 },
}

impl ContentError {
    pub fn code(&self) -> u16 {
        match self {
            ContentError::Unexpected(_) => reply::UNEXPECTED_FRAME,
            ContentError::TooLarge { .. } => reply::PRECONDITION_FAILED,
        }
    }
}

// One assembler per channel, so the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Default)]
enum State {
    #[default]
    Idle,
    Header(Publish),
    Body {
        publish: Publish,
        properties: Box<AMQPProperties>,
        header: Bytes,
        remaining: u64,
        single: Option<Bytes>,
        buf: BytesMut,
    },
    Discard {
        remaining: u64,
    },
}

/// Per-channel content assembler.
#[derive(Debug)]
pub struct Assembler {
    state: State,
    max_size: u64,
}

/// What a frame did to the assembler.
#[derive(Debug)]
pub enum Step {
    /// More frames are needed.
    Pending,
    /// The message is complete.
    Done(Box<Content>),
}

impl Assembler {
    pub fn new(max_size: u64) -> Self {
        Assembler {
            state: State::Idle,
            max_size,
        }
    }

    /// True while a message is being assembled: only header or body frames may come next.
    pub fn in_progress(&self) -> bool {
        !matches!(self.state, State::Idle)
    }

    /// Starts a message with its basic.publish.
    pub fn start(&mut self, publish: Publish) -> Result<(), ContentError> {
        if self.in_progress() {
            return Err(unexpected_method());
        }
        self.state = State::Header(publish);
        Ok(())
    }

    /// Feeds a content header.
    pub fn header(
        &mut self,
        class_id: u16,
        body_size: u64,
        properties: Box<AMQPProperties>,
        raw: Bytes,
    ) -> Result<Step, ContentError> {
        let publish = match std::mem::take(&mut self.state) {
            State::Header(p) => p,
            State::Idle => {
                return Err(ContentError::Unexpected(
                    "expected method frame, got non method frame instead".into(),
                ))
            }
            _ => {
                return Err(ContentError::Unexpected(
                    "expected content body, got non content body frame instead".into(),
                ))
            }
        };
        if class_id != CLASS_BASIC {
            return Err(ContentError::Unexpected(format!(
                "expected content header for class {CLASS_BASIC}, got one for class {class_id} instead"
            )));
        }
        if body_size > self.max_size {
            self.state = if body_size == 0 {
                State::Idle
            } else {
                State::Discard {
                    remaining: body_size,
                }
            };
            return Err(ContentError::TooLarge {
                size: body_size,
                max: self.max_size,
            });
        }
        if body_size == 0 {
            return Ok(Step::Done(Box::new(Content {
                publish,
                properties,
                header: own(raw),
                body: Bytes::new(),
            })));
        }
        self.state = State::Body {
            publish,
            properties,
            header: own(raw),
            remaining: body_size,
            single: None,
            buf: BytesMut::new(),
        };
        Ok(Step::Pending)
    }

    /// Feeds a body frame.
    pub fn body(&mut self, payload: Bytes) -> Result<Step, ContentError> {
        match &mut self.state {
            State::Discard { remaining } => {
                *remaining = remaining.saturating_sub(payload.len() as u64);
                if *remaining == 0 {
                    self.state = State::Idle;
                }
                Ok(Step::Pending)
            }
            State::Body { remaining, single, buf, .. } => {
                let n = payload.len() as u64;
                if n > *remaining {
                    let left = *remaining;
                    self.state = State::Idle;
                    return Err(ContentError::Unexpected(format!(
                        "content body frame of {n} bytes exceeds the {left} bytes left of the declared size"
                    )));
                }
                *remaining -= n;
                if single.is_none() && buf.is_empty() {
                    *single = Some(payload);
                } else {
                    if let Some(first) = single.take() {
                        buf.reserve((first.len() as u64 + n + *remaining).min(1 << 20) as usize);
                        buf.extend_from_slice(&first);
                    }
                    buf.extend_from_slice(&payload);
                }
                Ok(self.done_if_complete())
            }
            State::Idle => Err(ContentError::Unexpected(
                "expected method frame, got non method frame instead".into(),
            )),
            State::Header(_) => Err(ContentError::Unexpected(format!(
                "expected content header for class {CLASS_BASIC}, got non content header frame instead"
            ))),
        }
    }

    /// Body bytes still expected (0 unless a body is being assembled).
    pub fn body_left(&self) -> u64 {
        match &self.state {
            State::Body { remaining, .. } => *remaining,
            _ => 0,
        }
    }

    /// For a reader that writes the payload of a body frame of `len` bytes straight into the
    /// message body instead of through its read buffer (which costs a copy of every large
    /// body): the body so far, with room for at least the frame. None unless a body is being
    /// assembled and the frame fits in what is left of it. The buffer never exceeds the
    /// declared size, and room ahead of the bytes received is at most the larger of 1 MiB and
    /// what has arrived, so a declared size alone allocates little. The buffer comes back,
    /// `len` bytes longer, in `body_in_place`.
    pub fn take_body_buffer(&mut self, len: usize) -> Option<BytesMut> {
        let State::Body {
            remaining,
            single,
            buf,
            ..
        } = &mut self.state
        else {
            return None;
        };
        if len as u64 > *remaining {
            return None;
        }
        let first = single.take();
        let have = buf.len() + first.as_ref().map_or(0, Bytes::len);
        // `len` and `ahead` are both at most what is left of the declared size.
        let ahead = (*remaining).min(have.max(1 << 20) as u64) as usize;
        let room = have + ahead.max(len);
        let mut body = if buf.capacity() >= room {
            std::mem::take(buf)
        } else {
            // Sized here rather than grown by `reserve`, which may double past the body.
            let mut grown = BytesMut::with_capacity(room);
            grown.extend_from_slice(buf);
            *buf = BytesMut::new();
            grown
        };
        if let Some(first) = first {
            body.extend_from_slice(&first);
        }
        Some(body)
    }

    /// Takes back the buffer of `take_body_buffer` with one body frame's `len` bytes of
    /// payload written at its end.
    pub fn body_in_place(&mut self, body: BytesMut, len: usize) -> Result<Step, ContentError> {
        let n = len as u64;
        match &mut self.state {
            State::Body {
                remaining,
                single: None,
                buf,
                ..
            } if buf.is_empty() && n <= *remaining && len <= body.len() => {
                *remaining -= n;
                *buf = body;
                Ok(self.done_if_complete())
            }
            _ => {
                self.state = State::Idle;
                Err(ContentError::Unexpected(format!(
                    "content body frame of {n} bytes does not fit the message being assembled"
                )))
            }
        }
    }

    /// `Done` once a body has all its declared bytes.
    fn done_if_complete(&mut self) -> Step {
        if !matches!(self.state, State::Body { remaining: 0, .. }) {
            return Step::Pending;
        }
        match std::mem::take(&mut self.state) {
            State::Body {
                publish,
                properties,
                header,
                single,
                buf,
                ..
            } => {
                let body = single.map(own).unwrap_or_else(|| buf.freeze());
                Step::Done(Box::new(Content {
                    publish,
                    properties,
                    header,
                    body,
                }))
            }
            _ => Step::Pending,
        }
    }

    /// A method frame arrived: an error if a message is being assembled.
    pub fn check_method(&self) -> Result<(), ContentError> {
        match self.state {
            State::Idle => Ok(()),
            State::Discard { .. } => Ok(()),
            _ => Err(unexpected_method()),
        }
    }

    /// Forgets any partial message (channel closed).
    pub fn reset(&mut self) {
        self.state = State::Idle;
    }
}

fn unexpected_method() -> ContentError {
    ContentError::Unexpected(format!(
        "expected content header for class {CLASS_BASIC}, got non content header frame instead"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish() -> Publish {
        Publish {
            exchange: "".into(),
            routing_key: "q".into(),
            mandatory: false,
            immediate: false,
        }
    }

    /// One content's header and body frames, sliced from one read buffer as the codec does.
    fn assemble(header: usize, body: usize) -> (Bytes, Box<Content>) {
        let read = Bytes::from(vec![7u8; header + body]);
        let mut a = Assembler::new(1 << 20);
        a.start(publish()).unwrap();
        assert!(matches!(
            a.header(60, body as u64, Box::default(), read.slice(..header)),
            Ok(Step::Pending)
        ));
        match a.body(read.slice(header..)).unwrap() {
            Step::Done(c) => {
                assert!(!a.in_progress());
                (read, c)
            }
            Step::Pending => panic!("should be done"),
        }
    }

    fn inside(part: &Bytes, buf: &Bytes) -> bool {
        let (p, b) = (part.as_ptr() as usize, buf.as_ptr() as usize);
        p >= b && p < b + buf.len()
    }

    #[test]
    fn small_parts_leave_the_read_buffer_and_large_bodies_stay_slices() {
        let (read, c) = assemble(20, 16);
        assert_eq!((c.header.len(), c.body.len()), (20, 16));
        assert!(
            !inside(&c.header, &read),
            "a small header pins the read buffer"
        );
        assert!(!inside(&c.body, &read), "a small body pins the read buffer");
        let (read, c) = assemble(20, OWN_BELOW);
        assert!(!inside(&c.header, &read));
        assert!(inside(&c.body, &read), "a large one-frame body is copied");
        assert_eq!(c.body.len(), OWN_BELOW);
    }

    #[test]
    fn multi_frame_body_and_empty_body() {
        let mut a = Assembler::new(1000);
        a.start(publish()).unwrap();
        a.header(60, 6, Box::default(), Bytes::new()).unwrap();
        assert!(matches!(
            a.body(Bytes::from_static(b"abc")),
            Ok(Step::Pending)
        ));
        match a.body(Bytes::from_static(b"def")).unwrap() {
            Step::Done(c) => assert_eq!(&c.body[..], b"abcdef"),
            Step::Pending => panic!(),
        }
        a.start(publish()).unwrap();
        assert!(matches!(
            a.header(60, 0, Box::default(), Bytes::new()),
            Ok(Step::Done(_))
        ));
    }

    /// Frames read in place and frames through the read buffer, mixed, make one body in one
    /// allocation; a frame longer than what is left, or a buffer given back to an assembler
    /// that is not waiting for it, is refused.
    #[test]
    fn bodies_read_in_place() {
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut a = Assembler::new(1 << 30);
        a.start(publish()).unwrap();
        a.header(60, body.len() as u64, Box::default(), Bytes::new())
            .unwrap();
        assert!(matches!(
            a.body(Bytes::copy_from_slice(&body[..1000])),
            Ok(Step::Pending)
        ));
        assert_eq!(a.body_left(), 299_000);
        assert!(
            a.take_body_buffer(299_001).is_none(),
            "longer than what is left"
        );
        let mut buf = a.take_body_buffer(100_000).unwrap();
        assert!(buf.capacity() >= body.len(), "room for the whole body");
        let at = buf.as_ptr();
        buf.extend_from_slice(&body[1000..101_000]);
        assert!(matches!(a.body_in_place(buf, 100_000), Ok(Step::Pending)));
        assert!(matches!(
            a.body(Bytes::copy_from_slice(&body[101_000..102_000])),
            Ok(Step::Pending)
        ));
        let mut buf = a.take_body_buffer(198_000).unwrap();
        buf.extend_from_slice(&body[102_000..]);
        match a.body_in_place(buf, 198_000).unwrap() {
            Step::Done(c) => {
                assert!(c.body == body);
                assert_eq!(c.body.as_ptr(), at, "one allocation");
            }
            Step::Pending => panic!("should be done"),
        }
        assert!(!a.in_progress());
        assert!(a.take_body_buffer(10).is_none(), "no body expected");
        assert!(a.body_in_place(BytesMut::from(&b"stray"[..]), 5).is_err());
    }

    /// A declared size alone does not allocate it: room ahead of what arrived is at most 1 MiB
    /// or what arrived, whichever is larger.
    #[test]
    fn a_lent_body_grows_with_what_arrives() {
        let mut a = Assembler::new(1 << 30);
        a.start(publish()).unwrap();
        a.header(60, 1 << 29, Box::default(), Bytes::new()).unwrap();
        let mut buf = a.take_body_buffer(131_064).unwrap();
        assert!(buf.capacity() < 2 << 20, "{}", buf.capacity());
        buf.resize(131_064, 1);
        assert!(matches!(a.body_in_place(buf, 131_064), Ok(Step::Pending)));
    }

    #[test]
    fn unexpected_frames() {
        let mut a = Assembler::new(1000);
        assert_eq!(
            a.body(Bytes::new()).unwrap_err().code(),
            reply::UNEXPECTED_FRAME
        );
        assert!(a.header(60, 1, Box::default(), Bytes::new()).is_err());
        a.start(publish()).unwrap();
        assert_eq!(
            a.check_method().unwrap_err().code(),
            reply::UNEXPECTED_FRAME
        );
        assert!(a.body(Bytes::from_static(b"x")).is_err());
        let mut a = Assembler::new(1000);
        a.start(publish()).unwrap();
        assert!(a.header(50, 1, Box::default(), Bytes::new()).is_err());
    }

    #[test]
    fn body_longer_than_declared() {
        let mut a = Assembler::new(1000);
        a.start(publish()).unwrap();
        a.header(60, 3, Box::default(), Bytes::new()).unwrap();
        let err = a.body(Bytes::from_static(b"abcd")).unwrap_err();
        assert_eq!(err.code(), reply::UNEXPECTED_FRAME);
    }

    #[test]
    fn oversized_is_refused_and_discarded() {
        let mut a = Assembler::new(10);
        a.start(publish()).unwrap();
        let err = a.header(60, 25, Box::default(), Bytes::new()).unwrap_err();
        assert_eq!(err, ContentError::TooLarge { size: 25, max: 10 });
        assert_eq!(err.code(), reply::PRECONDITION_FAILED);
        assert!(matches!(
            a.body(Bytes::from(vec![0; 20])),
            Ok(Step::Pending)
        ));
        assert!(a.in_progress());
        assert!(matches!(a.body(Bytes::from(vec![0; 5])), Ok(Step::Pending)));
        assert!(!a.in_progress());
    }
}
