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
    pub properties: AMQPProperties,
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
        properties: AMQPProperties,
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
        properties: AMQPProperties,
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
                if *remaining > 0 {
                    return Ok(Step::Pending);
                }
                match std::mem::take(&mut self.state) {
                    State::Body { publish, properties, header, single, buf, .. } => {
                        let body = single.map(own).unwrap_or_else(|| buf.freeze());
                        Ok(Step::Done(Box::new(Content { publish, properties, header, body })))
                    }
                    _ => Ok(Step::Pending),
                }
            }
            State::Idle => Err(ContentError::Unexpected(
                "expected method frame, got non method frame instead".into(),
            )),
            State::Header(_) => Err(ContentError::Unexpected(format!(
                "expected content header for class {CLASS_BASIC}, got non content header frame instead"
            ))),
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
            a.header(
                60,
                body as u64,
                AMQPProperties::default(),
                read.slice(..header)
            ),
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
        a.header(60, 6, AMQPProperties::default(), Bytes::new())
            .unwrap();
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
            a.header(60, 0, AMQPProperties::default(), Bytes::new()),
            Ok(Step::Done(_))
        ));
    }

    #[test]
    fn unexpected_frames() {
        let mut a = Assembler::new(1000);
        assert_eq!(
            a.body(Bytes::new()).unwrap_err().code(),
            reply::UNEXPECTED_FRAME
        );
        assert!(a
            .header(60, 1, AMQPProperties::default(), Bytes::new())
            .is_err());
        a.start(publish()).unwrap();
        assert_eq!(
            a.check_method().unwrap_err().code(),
            reply::UNEXPECTED_FRAME
        );
        assert!(a.body(Bytes::from_static(b"x")).is_err());
        let mut a = Assembler::new(1000);
        a.start(publish()).unwrap();
        assert!(a
            .header(50, 1, AMQPProperties::default(), Bytes::new())
            .is_err());
    }

    #[test]
    fn body_longer_than_declared() {
        let mut a = Assembler::new(1000);
        a.start(publish()).unwrap();
        a.header(60, 3, AMQPProperties::default(), Bytes::new())
            .unwrap();
        let err = a.body(Bytes::from_static(b"abcd")).unwrap_err();
        assert_eq!(err.code(), reply::UNEXPECTED_FRAME);
    }

    #[test]
    fn oversized_is_refused_and_discarded() {
        let mut a = Assembler::new(10);
        a.start(publish()).unwrap();
        let err = a
            .header(60, 25, AMQPProperties::default(), Bytes::new())
            .unwrap_err();
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
