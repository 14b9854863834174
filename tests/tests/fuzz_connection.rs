//! Fuzzing of the whole connection state machine on stable Rust, with proptest: an in-process
//! Warren is fed random frame sequences on raw sockets. Each case is a handshake prefix (valid
//! most of the time, sometimes skipped, cut or wrong: protocol header, start-ok, tune-ok, open),
//! then random methods on random channels (channel open/close/flow, exchange and queue
//! declare/bind/unbind/purge/delete with random arguments, basic.publish with content headers
//! and bodies of random and wrong sizes, consume/cancel/get/ack/nack/reject with random tags,
//! qos, recover, tx and confirm select), heartbeats, garbage, unknown methods and oversized
//! frames; then the client half-closes, sends connection.close, or goes silent.
//!
//! Invariants, for every case:
//! - no panic anywhere in the broker (a panic hook records them: a connection task's panic is
//!   contained by the broker, so it would otherwise only show as a 541);
//! - no hang: after a half-close (or a client connection.close followed, after 2 s of silence,
//!   by a half-close) the server closes the socket within 6 s of silence; a silent client is
//!   read until close or 2 s of silence;
//! - every connection.close the server sends has one of the AMQP hard codes or 403 (never 541),
//!   every channel.close a soft code (403, 404, 405, 406), every frame it sends parses;
//! - when the only fault in the case is its first frame after a valid handshake, the close
//!   carries that fault's code (501, 505, 504, 540);
//! - afterwards a fresh lapin connection still declares a queue, publishes and gets a message.
//!
//! The default (64 cases) runs in about 10-20 s in a debug build
//! (`cargo test -p warren-tests --test fuzz_connection`). Run longer by hand with, e.g.:
//!
//! ```text
//! WARREN_FUZZ_CASES=2000 cargo test --release -p warren-tests --test fuzz_connection -- --nocapture
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use lapin::{options::*, BasicProperties, Connection, ConnectionProperties};
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_protocol::{
    codec::{Decoder, Frame},
    encode::{content_header_payload, encode_frame},
    protocol::{access, basic, channel, confirm, connection, exchange, queue, tx, AMQPClass},
    types::DecimalValue,
    AMQPProperties, AMQPValue, FieldTable, LongString, ShortString, CLASS_BASIC, FRAME_END,
    PROTOCOL_HEADER,
};

// ---------------------------------------------------------------------------------------------
// Configuration

/// Cases: `WARREN_FUZZ_CASES` if set, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("WARREN_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The broker's frame_max (its default) and the message size limit the fuzz broker runs with.
const SERVER_FRAME_MAX: u32 = 131_072;
const MAX_MESSAGE_SIZE: u64 = 64 * 1024;

/// Codes a server may close a connection with (RabbitMQ's hard errors, and 403 for a refused
/// login or vhost); 541 is excluded: Warren sends it only for a panicking connection.
const CONNECTION_CODES: &[u16] = &[
    320, 402, 403, 404, 405, 406, 501, 502, 503, 504, 505, 506, 530, 540,
];
/// Codes a server may close a channel with (the soft errors).
const CHANNEL_CODES: &[u16] = &[403, 404, 405, 406];

// ---------------------------------------------------------------------------------------------
// Panic recorder

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records every panic (and still prints it): the broker contains a connection task's panic,
/// so the test would not otherwise see it.
fn record_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(info.to_string());
        default(info);
    }));
}

fn take_panics() -> Vec<String> {
    std::mem::take(&mut *PANICS.lock().unwrap_or_else(|e| e.into_inner()))
}

// ---------------------------------------------------------------------------------------------
// Cases

#[derive(Debug, Clone, PartialEq)]
enum ProtoHeader {
    Right,
    /// Eight bytes that are not 0-9-1's.
    Wrong(Vec<u8>),
    /// The first `n` bytes of the right one.
    Cut(usize),
    Absent,
}

#[derive(Debug, Clone, PartialEq)]
enum Login {
    Plain,
    AmqPlain,
    BadPassword,
    /// Bad password, with `authentication_failure_close` announced: a 403 close.
    BadPasswordWithClose,
    UnknownMechanism,
    Malformed(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Handshake {
    header: ProtoHeader,
    login: Option<Login>,
    /// channel_max, frame_max, heartbeat.
    tune_ok: Option<(u16, u32, u16)>,
    open: Option<String>,
}

impl Handshake {
    /// Does the handshake end with the connection open (as far as the client can tell)?
    fn valid(&self) -> bool {
        let (channel_max, frame_max, _) = self.tune_ok.unwrap_or((0, 1, 0));
        self.header == ProtoHeader::Right
            && matches!(self.login, Some(Login::Plain | Login::AmqPlain))
            && channel_max != 0
            && channel_max <= 2047
            && (8192..=SERVER_FRAME_MAX).contains(&frame_max)
            && self.open.as_deref() == Some("/")
    }

    /// The frame_max in force for body frames after this handshake.
    fn frame_max(&self) -> u32 {
        self.tune_ok.map_or(4096, |t| t.1)
    }
}

#[derive(Debug, Clone)]
enum HeaderKind {
    /// A content header declaring the bodies' total.
    Exact,
    Declared(u64),
    WrongClass(u16),
    Missing,
}

// Test data only: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Op {
    Method(u16, AMQPClass),
    Publish {
        channel: u16,
        exchange: &'static str,
        key: &'static str,
        mandatory: bool,
        immediate: bool,
        props: AMQPProperties,
        header: HeaderKind,
        bodies: Vec<usize>,
    },
    Heartbeat(u16),
    Garbage(Vec<u8>),
    /// A frame of any type with any payload and end octet.
    RawFrame {
        kind: u8,
        channel: u16,
        payload: Vec<u8>,
        end: u8,
    },
    /// Only the 7-byte header of a frame declaring `size` bytes.
    Oversized {
        kind: u8,
        channel: u16,
        size: u32,
    },
    /// A method frame with ids no class has.
    UnknownMethod {
        channel: u16,
        class_id: u16,
        method_id: u16,
    },
    /// basic.qos with a prefetch_size (540).
    QosPrefetchSize(u16, u32),
    /// channel.close then channel.open: brings back a channel a channel error closed (the
    /// server answers close with close-ok in either state).
    Reopen(u16),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    HalfClose,
    CloseFrame,
    Silence,
}

#[derive(Debug, Clone)]
struct Case {
    handshake: Handshake,
    /// Open channels 1, 2 and 3 before `ops`.
    open_first: bool,
    ops: Vec<Op>,
    end: End,
}

const QUEUES: &[&str] = &["fq0", "fq1", "fq2", "", "amq.rabbitmq.reply-to", "amq.q"];
const EXCHANGES: &[&str] = &[
    "",
    "amq.direct",
    "amq.topic",
    "amq.fanout",
    "amq.headers",
    "fx0",
    "fx1",
    "amq.nope",
];
const KEYS: &[&str] = &[
    "",
    "fq0",
    "fq1",
    "a.b",
    "#",
    "*",
    "a.*",
    "amq.rabbitmq.reply-to",
];
const TAGS: &[&str] = &["", "t0", "t1"];
/// The pools of deep cases: repeats weight the names that exist or route.
const DEEP_QUEUES: &[&str] = &[
    "fq0",
    "fq0",
    "fq0",
    "fq1",
    "fq1",
    "fq2",
    "",
    "amq.rabbitmq.reply-to",
];
const DEEP_EXCHANGES: &[&str] = &[
    "",
    "",
    "",
    "amq.direct",
    "amq.topic",
    "amq.fanout",
    "amq.headers",
    "fx0",
    "fx1",
];
const DEEP_KEYS: &[&str] = &["fq0", "fq0", "fq1", "fq1", "a.b", "#", "*", "a.*", ""];

fn queues(deep: bool) -> &'static [&'static str] {
    if deep {
        DEEP_QUEUES
    } else {
        QUEUES
    }
}

fn exchanges(deep: bool) -> &'static [&'static str] {
    if deep {
        DEEP_EXCHANGES
    } else {
        EXCHANGES
    }
}

/// Names for exchange.declare/delete/bind: deep cases leave out the default exchange (403).
fn exchange_names(deep: bool) -> &'static [&'static str] {
    if deep {
        &[
            "fx0",
            "fx0",
            "fx1",
            "fx1",
            "amq.direct",
            "amq.topic",
            "amq.nope",
        ]
    } else {
        EXCHANGES
    }
}

fn keys(deep: bool) -> &'static [&'static str] {
    if deep {
        DEEP_KEYS
    } else {
        KEYS
    }
}

fn pick(names: &'static [&'static str]) -> impl Strategy<Value = &'static str> {
    prop::sample::select(names)
}

fn sstr(names: &'static [&'static str]) -> impl Strategy<Value = ShortString> {
    pick(names).prop_map(ShortString::from)
}

/// Mostly the channels a case opens first (1 to 3); now and then channel 0 or any other.
fn channel_id() -> impl Strategy<Value = u16> {
    prop_oneof![30 => 1u16..=3, 1 => Just(0u16), 1 => any::<u16>()]
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// `n` as the integer width picked by `w` (long-long when it does not fit).
fn int_as(n: i64, w: u8) -> AMQPValue {
    match w {
        0 => i8::try_from(n).map(AMQPValue::ShortShortInt).ok(),
        1 => u8::try_from(n).map(AMQPValue::ShortShortUInt).ok(),
        2 => i16::try_from(n).map(AMQPValue::ShortInt).ok(),
        3 => u16::try_from(n).map(AMQPValue::ShortUInt).ok(),
        4 => i32::try_from(n).map(AMQPValue::LongInt).ok(),
        5 => u32::try_from(n).map(AMQPValue::LongUInt).ok(),
        _ => None,
    }
    .unwrap_or(AMQPValue::LongLongInt(n))
}

/// A field value for an argument: edge integers, meaningful strings, or anything that
/// survives the wire (amq-protocol writes `ShortString` values with a type id nobody reads).
fn arg_value() -> impl Strategy<Value = AMQPValue> {
    let ints = prop_oneof![
        Just(0i64),
        Just(1),
        Just(-1),
        Just(5),
        Just(50),
        Just(255),
        Just(256),
        Just(315_360_000_001),
        any::<i64>(),
    ];
    let strings = prop_oneof![
        Just("drop-head"),
        Just("reject-publish"),
        Just("reject-publish-dlx"),
        Just("lazy"),
        Just("classic"),
        Just("quorum"),
        Just("stream"),
        Just("direct"),
        Just("topic"),
        Just("headers"),
        Just("fanout"),
        Just("fx0"),
        Just("fx1"),
        Just("amq.direct"),
        Just("all"),
        Just("any"),
        Just("any-with-x"),
        Just("nope"),
        Just(""),
    ];
    prop_oneof![
        4 => (ints, 0u8..7).prop_map(|(n, w)| int_as(n, w)),
        4 => strings.prop_map(long),
        1 => Just(long(&"d".repeat(256))),
        1 => any::<bool>().prop_map(AMQPValue::Boolean),
        1 => any::<u64>().prop_map(AMQPValue::Timestamp),
        1 => (any::<u8>(), any::<u32>()).prop_map(|(scale, value)| {
            AMQPValue::DecimalValue(DecimalValue { scale, value })
        }),
        1 => (-1e3f64..1e3).prop_map(AMQPValue::Double),
        1 => Just(AMQPValue::Void),
        1 => Just(AMQPValue::FieldArray(vec![AMQPValue::LongInt(1), long("x")].into())),
        1 => prop::collection::vec(any::<u8>(), 0..8).prop_map(|v| AMQPValue::ByteArray(v.into())),
    ]
}

/// Arguments with the given keys; `deep` cases mostly pass none.
fn args_table(keys: &'static [&'static str], deep: bool) -> impl Strategy<Value = FieldTable> {
    prop_oneof![
        if deep { 6 } else { 2 } => Just(FieldTable::default()),
        3 => prop::collection::vec((pick(keys), arg_value()), 1..4).prop_map(|kv| {
            let mut t = FieldTable::default();
            for (k, v) in kv {
                t.insert(k.into(), v);
            }
            t
        }),
    ]
}

const QUEUE_ARG_KEYS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-single-active-consumer",
    "x-delivery-limit",
    "x-consumer-timeout",
    "x-foo",
];
const EXCHANGE_ARG_KEYS: &[&str] = &["alternate-exchange", "x-delayed-type", "x-foo"];
const BIND_ARG_KEYS: &[&str] = &["x-match", "a", "b", "x-a"];
const CONSUME_ARG_KEYS: &[&str] = &["x-priority", "x-foo"];

/// Message properties; `deep` cases mostly carry a valid expiration.
fn properties(deep: bool) -> impl Strategy<Value = AMQPProperties> {
    let expiration = prop_oneof![
        if deep { 12 } else { 3 } => pick(&["0", "10", "1000"]),
        4 => pick(&["", "-1", "abc", "99999999999999999999", "5x"]),
    ];
    let headers = prop::collection::vec(
        (
            pick(&["x-delay", "a", "b", "x-a", "x-death", "CC", "BCC"]),
            arg_value(),
        ),
        0..3,
    )
    .prop_map(|kv| {
        let mut t = FieldTable::default();
        for (k, v) in kv {
            t.insert(k.into(), v);
        }
        t
    });
    (
        prop::option::of(prop_oneof![Just(1u8), Just(2u8), any::<u8>()]),
        prop::option::of(expiration),
        prop::option::of(any::<u8>()),
        prop::option::of(headers),
        prop::option::of(prop_oneof![
            if deep { 1 } else { 4 } => Just("amq.rabbitmq.reply-to"),
            4 => pick(&["fq0", ""]),
        ]),
    )
        .prop_map(|(mode, exp, prio, headers, reply_to)| {
            let mut p = AMQPProperties::default();
            if let Some(v) = mode {
                p = p.with_delivery_mode(v);
            }
            if let Some(v) = exp {
                p = p.with_expiration(v.into());
            }
            if let Some(v) = prio {
                p = p.with_priority(v);
            }
            if let Some(v) = headers {
                p = p.with_headers(v);
            }
            if let Some(v) = reply_to {
                p = p.with_reply_to(v.into());
            }
            p
        })
}

fn delivery_tag() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..6, 1 => any::<u64>()]
}

/// Method flags: in deep cases each is set one time in six (durable, exclusive, auto-delete,
/// passive and nowait make redeclares inequivalent or name missing queues).
fn flags<const N: usize>(deep: bool) -> BoxedStrategy<[bool; N]> {
    prop::array::uniform(prop::bool::weighted(if deep { 1.0 / 6.0 } else { 0.5 })).boxed()
}

/// A method with random fields. `deep`: none that ends a channel or the connection by itself
/// (channel open/close/close-ok, connection methods, a server-only method): cases of those
/// methods go deeper into the broker's state before a fault ends them.
fn method(deep: bool) -> BoxedStrategy<AMQPClass> {
    use basic::AMQPMethod as B;
    use exchange::AMQPMethod as E;
    use queue::AMQPMethod as Q;
    // (weight, wild only, strategy)
    let arms: Vec<(u32, bool, BoxedStrategy<AMQPClass>)> = vec![
        (
            2,
            true,
            Just(AMQPClass::Channel(channel::AMQPMethod::Open(
                channel::Open {},
            )))
            .boxed(),
        ),
        (
            1,
            true,
            (prop_oneof![Just(200u16), any::<u16>()])
                .prop_map(|reply_code| {
                    AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                        reply_code,
                        reply_text: "bye".into(),
                        class_id: 0,
                        method_id: 0,
                    }))
                })
                .boxed(),
        ),
        (
            1,
            true,
            Just(AMQPClass::Channel(channel::AMQPMethod::CloseOk(
                channel::CloseOk {},
            )))
            .boxed(),
        ),
        (
            1,
            true,
            any::<bool>()
                .prop_map(|active| {
                    AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active }))
                })
                .boxed(),
        ),
        (
            1,
            false,
            Just(AMQPClass::Access(access::AMQPMethod::Request(
                access::Request::default(),
            )))
            .boxed(),
        ),
        (
            3,
            false,
            (
                sstr(exchange_names(deep)),
                pick(&[
                    "direct",
                    "fanout",
                    "topic",
                    "headers",
                    "x-delayed-message",
                    "nonsense",
                ]),
                flags::<5>(deep),
                args_table(EXCHANGE_ARG_KEYS, deep),
            )
                .prop_map(|(exchange, kind, f, arguments)| {
                    AMQPClass::Exchange(E::Declare(exchange::Declare {
                        exchange,
                        kind: kind.into(),
                        passive: f[0] && f[1],
                        durable: f[1],
                        auto_delete: f[2],
                        internal: f[3] && f[4],
                        nowait: f[4] && f[0],
                        arguments,
                    }))
                })
                .boxed(),
        ),
        (
            1,
            false,
            (sstr(exchange_names(deep)), any::<bool>(), any::<bool>())
                .prop_map(|(exchange, if_unused, nowait)| {
                    AMQPClass::Exchange(E::Delete(exchange::Delete {
                        exchange,
                        if_unused,
                        nowait,
                    }))
                })
                .boxed(),
        ),
        (
            1,
            false,
            (
                sstr(exchange_names(deep)),
                sstr(exchange_names(deep)),
                sstr(keys(deep)),
                args_table(BIND_ARG_KEYS, deep),
                any::<bool>(),
            )
                .prop_map(|(destination, source, routing_key, arguments, bind)| {
                    if bind {
                        AMQPClass::Exchange(E::Bind(exchange::Bind {
                            destination,
                            source,
                            routing_key,
                            nowait: false,
                            arguments,
                        }))
                    } else {
                        AMQPClass::Exchange(E::Unbind(exchange::Unbind {
                            destination,
                            source,
                            routing_key,
                            nowait: false,
                            arguments,
                        }))
                    }
                })
                .boxed(),
        ),
        (
            5,
            false,
            (
                sstr(queues(deep)),
                flags::<5>(deep),
                args_table(QUEUE_ARG_KEYS, deep),
            )
                .prop_map(|(queue, f, arguments)| {
                    AMQPClass::Queue(Q::Declare(queue::Declare {
                        queue,
                        passive: f[0] && f[1],
                        durable: f[1],
                        exclusive: f[2],
                        auto_delete: f[3],
                        nowait: f[4] && f[0],
                        arguments,
                    }))
                })
                .boxed(),
        ),
        (
            3,
            false,
            (
                sstr(queues(deep)),
                sstr(exchanges(deep)),
                sstr(keys(deep)),
                args_table(BIND_ARG_KEYS, deep),
                any::<bool>(),
            )
                .prop_map(|(queue, exchange, routing_key, arguments, bind)| {
                    if bind {
                        AMQPClass::Queue(Q::Bind(queue::Bind {
                            queue,
                            exchange,
                            routing_key,
                            nowait: false,
                            arguments,
                        }))
                    } else {
                        AMQPClass::Queue(Q::Unbind(queue::Unbind {
                            queue,
                            exchange,
                            routing_key,
                            arguments,
                        }))
                    }
                })
                .boxed(),
        ),
        (
            2,
            false,
            (sstr(queues(deep)), flags::<3>(deep), any::<bool>())
                .prop_map(|(queue, f, purge)| {
                    AMQPClass::Queue(if purge {
                        Q::Purge(queue::Purge {
                            queue,
                            nowait: false,
                        })
                    } else {
                        Q::Delete(queue::Delete {
                            queue,
                            if_unused: f[0],
                            if_empty: f[1],
                            nowait: f[2] && f[0],
                        })
                    })
                })
                .boxed(),
        ),
        (
            2,
            false,
            (prop_oneof![0u16..4, any::<u16>()], any::<bool>())
                .prop_map(|(prefetch_count, global)| {
                    AMQPClass::Basic(B::Qos(basic::Qos {
                        prefetch_count,
                        global,
                    }))
                })
                .boxed(),
        ),
        (
            3,
            false,
            (
                sstr(queues(deep)),
                sstr(TAGS),
                flags::<3>(deep),
                args_table(CONSUME_ARG_KEYS, deep),
            )
                .prop_map(|(queue, consumer_tag, f, arguments)| {
                    AMQPClass::Basic(B::Consume(basic::Consume {
                        queue,
                        consumer_tag,
                        no_local: false,
                        no_ack: f[0],
                        exclusive: f[1],
                        nowait: f[2] && f[0],
                        arguments,
                    }))
                })
                .boxed(),
        ),
        (
            1,
            false,
            sstr(TAGS)
                .prop_map(|consumer_tag| {
                    AMQPClass::Basic(B::Cancel(basic::Cancel {
                        consumer_tag,
                        nowait: false,
                    }))
                })
                .boxed(),
        ),
        (
            3,
            false,
            (sstr(queues(deep)), any::<bool>())
                .prop_map(|(queue, no_ack)| AMQPClass::Basic(B::Get(basic::Get { queue, no_ack })))
                .boxed(),
        ),
        (
            if deep { 1 } else { 4 },
            false,
            (delivery_tag(), any::<bool>(), any::<bool>(), 0u8..3)
                .prop_map(|(delivery_tag, multiple, requeue, which)| {
                    AMQPClass::Basic(match which {
                        0 => B::Ack(basic::Ack {
                            delivery_tag,
                            multiple,
                        }),
                        1 => B::Reject(basic::Reject {
                            delivery_tag,
                            requeue,
                        }),
                        _ => B::Nack(basic::Nack {
                            delivery_tag,
                            multiple,
                            requeue,
                        }),
                    })
                })
                .boxed(),
        ),
        (
            1,
            false,
            (any::<bool>(), any::<bool>())
                .prop_map(|(requeue, sync)| {
                    AMQPClass::Basic(if sync {
                        B::Recover(basic::Recover { requeue })
                    } else {
                        B::RecoverAsync(basic::RecoverAsync { requeue })
                    })
                })
                .boxed(),
        ),
        (
            2,
            false,
            prop_oneof![
                Just(AMQPClass::Tx(tx::AMQPMethod::Select(tx::Select {}))),
                Just(AMQPClass::Tx(tx::AMQPMethod::Commit(tx::Commit {}))),
                Just(AMQPClass::Tx(tx::AMQPMethod::Rollback(tx::Rollback {}))),
                any::<bool>().prop_map(|nowait| AMQPClass::Confirm(confirm::AMQPMethod::Select(
                    confirm::Select { nowait }
                ))),
            ]
            .boxed(),
        ),
        (
            1,
            true,
            prop_oneof![
                Just(AMQPClass::Connection(connection::AMQPMethod::TuneOk(
                    connection::TuneOk {
                        channel_max: 10,
                        frame_max: 8192,
                        heartbeat: 0,
                    }
                ))),
                Just(AMQPClass::Connection(connection::AMQPMethod::Open(
                    connection::Open {
                        virtual_host: "/".into(),
                    }
                ))),
                Just(AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(
                    connection::UpdateSecret {
                        new_secret: LongString::from("s"),
                        reason: "r".into(),
                    }
                ))),
                Just(AMQPClass::Connection(connection::AMQPMethod::Blocked(
                    connection::Blocked { reason: "r".into() }
                ))),
                Just(AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                    connection::CloseOk {}
                ))),
                Just(AMQPClass::Basic(B::Deliver(basic::Deliver::default()))),
            ]
            .boxed(),
        ),
    ];
    Union::new_weighted(
        arms.into_iter()
            .filter(|(_, wild_only, _)| !deep || !wild_only)
            .map(|(w, _, s)| (w, s))
            .collect(),
    )
    .boxed()
}

fn publish(deep: bool) -> BoxedStrategy<Op> {
    let channel = if deep {
        (1u16..=3).boxed()
    } else {
        channel_id().boxed()
    };
    let header = if deep {
        prop_oneof![
            40 => Just(HeaderKind::Exact),
            1 => Just(HeaderKind::Declared(MAX_MESSAGE_SIZE + 1)),
        ]
        .boxed()
    } else {
        prop_oneof![
            12 => Just(HeaderKind::Exact),
            1 => prop_oneof![0u64..64, Just(MAX_MESSAGE_SIZE + 1), any::<u64>()]
                .prop_map(HeaderKind::Declared),
            1 => any::<u16>().prop_map(HeaderKind::WrongClass),
            1 => Just(HeaderKind::Missing),
        ]
        .boxed()
    };
    // Deep cases keep every body frame within the smallest frame_max a valid handshake picks.
    let body = if deep {
        prop_oneof![8 => 0usize..64, 2 => 64usize..8000].boxed()
    } else {
        prop_oneof![8 => 0usize..64, 2 => 64usize..4000, 1 => 8000usize..20_000].boxed()
    };
    (
        channel,
        pick(exchanges(deep)),
        pick(keys(deep)),
        any::<bool>(),
        // immediate=true is a 540 connection error: wild cases only.
        if deep {
            Just(false).boxed()
        } else {
            prop_oneof![15 => Just(false), 1 => Just(true)].boxed()
        },
        properties(deep),
        header,
        prop::collection::vec(body, 0..4),
    )
        .prop_map(
            |(channel, exchange, key, mandatory, immediate, props, header, bodies)| Op::Publish {
                channel,
                exchange,
                key,
                mandatory,
                immediate,
                props,
                header,
                bodies,
            },
        )
        .boxed()
}

/// Ops that are faults at the connection level (framing, unknown methods, 540s).
fn fault() -> BoxedStrategy<Op> {
    let raw = (
        prop_oneof![4 => prop::sample::select(vec![1u8, 2, 3, 8]), 1 => any::<u8>()],
        channel_id(),
        prop::collection::vec(any::<u8>(), 0..32),
        prop_oneof![4 => Just(FRAME_END), 1 => any::<u8>()],
    )
        .prop_map(|(kind, channel, payload, end)| Op::RawFrame {
            kind,
            channel,
            payload,
            end,
        });
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(Op::Garbage),
        1 => raw,
        1 => (
            prop::sample::select(vec![1u8, 2, 3, 8]),
            channel_id(),
            prop_oneof![Just(SERVER_FRAME_MAX), Just(4 << 20), any::<u32>()],
        )
            .prop_map(|(kind, channel, size)| Op::Oversized { kind, channel, size }),
        1 => (channel_id(), any::<u16>(), any::<u16>()).prop_map(|(channel, class_id, method_id)| {
            Op::UnknownMethod { channel, class_id, method_id }
        }),
        1 => (channel_id(), 1u32..100_000).prop_map(|(c, s)| Op::QosPrefetchSize(c, s)),
    ]
    .boxed()
}

/// Any op, on any channel: most cases of these end at their first fault.
fn wild_op() -> BoxedStrategy<Op> {
    prop_oneof![
        20 => (channel_id(), method(false)).prop_map(|(c, m)| Op::Method(c, m)),
        6 => publish(false),
        1 => prop_oneof![4 => Just(0u16), 1 => channel_id()].prop_map(Op::Heartbeat),
        1 => (1u16..=3).prop_map(Op::Reopen),
        5 => fault(),
    ]
    .boxed()
}

/// Ops on the open channels 1 to 3, valid at the frame level: a channel error is followed
/// sooner or later by a reopen of its channel. (A deep case has at most one fault.)
fn deep_op() -> BoxedStrategy<Op> {
    prop_oneof![
        30 => (1u16..=3, method(true)).prop_map(|(c, m)| Op::Method(c, m)),
        10 => publish(true),
        6 => (1u16..=3).prop_map(Op::Reopen),
        1 => Just(Op::Heartbeat(0)),
    ]
    .boxed()
}

fn valid_handshake() -> impl Strategy<Value = Handshake> {
    (
        prop_oneof![Just(Login::Plain), Just(Login::AmqPlain)],
        prop_oneof![
            Just(8192u32),
            Just(SERVER_FRAME_MAX),
            8192u32..=SERVER_FRAME_MAX
        ],
        prop_oneof![8 => Just(0u16), 1 => Just(60u16)],
    )
        .prop_map(|(login, frame_max, heartbeat)| Handshake {
            header: ProtoHeader::Right,
            login: Some(login),
            tune_ok: Some((2047, frame_max, heartbeat)),
            open: Some("/".into()),
        })
}

fn handshake() -> impl Strategy<Value = Handshake> {
    let header = prop_oneof![
        6 => Just(ProtoHeader::Right),
        1 => prop::collection::vec(any::<u8>(), 8).prop_map(ProtoHeader::Wrong),
        1 => Just(ProtoHeader::Wrong(b"AMQP\x01\x01\x00\x0a".to_vec())),
        1 => (0usize..8).prop_map(ProtoHeader::Cut),
        1 => Just(ProtoHeader::Absent),
    ];
    let login = prop::option::of(prop_oneof![
        3 => Just(Login::Plain),
        1 => Just(Login::AmqPlain),
        1 => Just(Login::BadPassword),
        1 => Just(Login::BadPasswordWithClose),
        1 => Just(Login::UnknownMechanism),
        1 => prop::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..12).prop_map(Login::Malformed),
    ]);
    let tune = prop::option::of((
        prop_oneof![Just(2047u16), Just(0), Just(4000), 1u16..5],
        prop_oneof![
            Just(SERVER_FRAME_MAX),
            Just(0),
            Just(4096),
            Just(SERVER_FRAME_MAX + 1),
            any::<u32>()
        ],
        prop_oneof![Just(0u16), Just(1)],
    ));
    let open =
        prop::option::of(prop_oneof![3 => Just("/".to_string()), 1 => Just("/nope".to_string())]);
    let broken = (header, login, tune, open).prop_map(|(header, login, tune_ok, open)| Handshake {
        header,
        login,
        tune_ok,
        open,
    });
    prop_oneof![5 => valid_handshake(), 2 => broken]
}

/// A small topology most deep cases start with: queues fq0 and fq1, fq1 bound to amq.topic
/// with `a.*` (on channel 3; an error there is only a channel error).
fn setup_ops() -> Vec<Op> {
    let declare = |name: &str| {
        Op::Method(
            3,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: name.into(),
                ..Default::default()
            })),
        )
    };
    vec![
        declare("fq0"),
        declare("fq1"),
        Op::Method(
            3,
            AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: "fq1".into(),
                exchange: "amq.topic".into(),
                routing_key: "a.*".into(),
                ..Default::default()
            })),
        ),
    ]
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![10 => Just(End::HalfClose), 5 => Just(End::CloseFrame), 1 => Just(End::Silence)]
}

/// Two kinds of case: deep ones (a valid handshake, channels 1 to 3 open, mostly valid ops,
/// up to 64 of them) explore the broker's state; wild ones (any handshake, any ops) its
/// reaction to faults.
fn case() -> impl Strategy<Value = Case> {
    let deep = (
        valid_handshake(),
        prop_oneof![3 => Just(true), 1 => Just(false)],
        prop::collection::vec(deep_op(), 0..64),
        prop::option::of((any::<prop::sample::Index>(), fault())),
        end(),
    )
        .prop_map(|(handshake, setup, mut ops, fault, end)| {
            if let Some((at, op)) = fault {
                ops.insert(at.index(ops.len() + 1), op);
            }
            if setup {
                ops.splice(0..0, setup_ops());
            }
            Case {
                handshake,
                open_first: true,
                ops,
                end,
            }
        });
    let wild = (
        handshake(),
        prop_oneof![4 => Just(true), 1 => Just(false)],
        prop::collection::vec(wild_op(), 0..32),
        end(),
    )
        .prop_map(|(handshake, open_first, ops, end)| Case {
            handshake,
            open_first,
            ops,
            end,
        });
    prop_oneof![2 => deep, 1 => wild]
}

// ---------------------------------------------------------------------------------------------
// Encoding

fn method_frame(out: &mut Vec<u8>, channel: u16, m: &AMQPClass) {
    encode_frame(out, channel, m).unwrap();
}

fn raw_frame(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8], end: u8) {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(end);
}

fn amqplain_response(user: &str, pass: &str) -> Vec<u8> {
    use warren_protocol::types::generation::gen_field_table;
    let mut t = FieldTable::default();
    t.insert("LOGIN".into(), long(user));
    t.insert("PASSWORD".into(), long(pass));
    let (v, _) = gen_field_table(&t)(warren_protocol::WriteContext::from(Vec::new()))
        .unwrap()
        .into_inner();
    v[4..].to_vec()
}

impl Handshake {
    fn encode(&self, out: &mut Vec<u8>) {
        match &self.header {
            ProtoHeader::Right => out.extend_from_slice(&PROTOCOL_HEADER),
            ProtoHeader::Wrong(b) => out.extend_from_slice(b),
            ProtoHeader::Cut(n) => out.extend_from_slice(&PROTOCOL_HEADER[..*n]),
            ProtoHeader::Absent => {}
        }
        let Some(login) = &self.login else {
            return;
        };
        let mut caps = FieldTable::default();
        if *login == Login::BadPasswordWithClose {
            caps.insert(
                "authentication_failure_close".into(),
                AMQPValue::Boolean(true),
            );
        }
        let mut client_properties = FieldTable::default();
        client_properties.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        let (mechanism, response) = match login {
            Login::Plain => ("PLAIN", b"\0guest\0guest".to_vec()),
            Login::AmqPlain => ("AMQPLAIN", amqplain_response("guest", "guest")),
            Login::BadPassword | Login::BadPasswordWithClose => {
                ("PLAIN", b"\0guest\0wrong".to_vec())
            }
            Login::UnknownMechanism => ("EXTERNAL", Vec::new()),
            Login::Malformed(b) => ("PLAIN", b.clone()),
        };
        method_frame(
            out,
            0,
            &AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties,
                mechanism: mechanism.into(),
                response: LongString::from(response),
                locale: "en_US".into(),
            })),
        );
        let Some((channel_max, frame_max, heartbeat)) = self.tune_ok else {
            return;
        };
        method_frame(
            out,
            0,
            &AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max,
                frame_max,
                heartbeat,
            })),
        );
        if let Some(vhost) = &self.open {
            method_frame(
                out,
                0,
                &AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                    virtual_host: vhost.as_str().into(),
                })),
            );
        }
    }
}

impl Op {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Method(c, m) => method_frame(out, *c, m),
            Op::Publish {
                channel,
                exchange,
                key,
                mandatory,
                immediate,
                props,
                header,
                bodies,
            } => {
                method_frame(
                    out,
                    *channel,
                    &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                        exchange: (*exchange).into(),
                        routing_key: (*key).into(),
                        mandatory: *mandatory,
                        immediate: *immediate,
                    })),
                );
                let total: usize = bodies.iter().sum();
                let (class, size) = match header {
                    HeaderKind::Exact => (CLASS_BASIC, total as u64),
                    HeaderKind::Declared(n) => (CLASS_BASIC, *n),
                    HeaderKind::WrongClass(c) => (*c, total as u64),
                    HeaderKind::Missing => (0, 0),
                };
                if !matches!(header, HeaderKind::Missing) {
                    let h = content_header_payload(class, size, props).unwrap();
                    raw_frame(out, 2, *channel, &h, FRAME_END);
                }
                for (i, n) in bodies.iter().enumerate() {
                    let body: Vec<u8> = (0..*n).map(|j| (i + j) as u8).collect();
                    raw_frame(out, 3, *channel, &body, FRAME_END);
                }
            }
            Op::Heartbeat(c) => raw_frame(out, 8, *c, &[], FRAME_END),
            Op::Garbage(b) => out.extend_from_slice(b),
            Op::RawFrame {
                kind,
                channel,
                payload,
                end,
            } => raw_frame(out, *kind, *channel, payload, *end),
            Op::Oversized {
                kind,
                channel,
                size,
            } => {
                out.push(*kind);
                out.extend_from_slice(&channel.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
            }
            Op::UnknownMethod {
                channel,
                class_id,
                method_id,
            } => {
                let mut p = Vec::new();
                p.extend_from_slice(&class_id.to_be_bytes());
                p.extend_from_slice(&method_id.to_be_bytes());
                raw_frame(out, 1, *channel, &p, FRAME_END);
            }
            Op::Reopen(c) => {
                method_frame(
                    out,
                    *c,
                    &AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                        reply_code: 200,
                        reply_text: "reopen".into(),
                        class_id: 0,
                        method_id: 0,
                    })),
                );
                method_frame(
                    out,
                    *c,
                    &AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
                );
            }
            Op::QosPrefetchSize(c, size) => {
                let start = out.len();
                method_frame(
                    out,
                    *c,
                    &AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                        prefetch_count: 1,
                        global: false,
                    })),
                );
                out[start + 7 + 4..start + 7 + 8].copy_from_slice(&size.to_be_bytes());
            }
        }
    }
}

impl Case {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.handshake.encode(&mut out);
        if self.open_first {
            for c in 1..=3 {
                method_frame(
                    &mut out,
                    c,
                    &AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
                );
            }
        }
        for op in &self.ops {
            op.encode(&mut out);
        }
        out
    }

    /// The connection.close code the first op must cause, when the handshake is valid, no
    /// channel is opened first, and the first op is a fault whose code is certain.
    fn expected_first_close(&self) -> Option<u16> {
        if !self.handshake.valid() || self.open_first {
            return None;
        }
        let fm = self.handshake.frame_max() as u64;
        match self.ops.first()? {
            // Only channel.open is allowed on a channel that is not open (channel.close-ok is
            // ignored there), and only connection methods on channel 0.
            Op::Method(0, AMQPClass::Connection(_)) => None,
            Op::Method(0, _) => Some(504),
            Op::Method(_, AMQPClass::Channel(channel::AMQPMethod::Open(_)))
            | Op::Method(_, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))) => None,
            Op::Method(_, AMQPClass::Connection(_)) => Some(504),
            Op::Method(..) => Some(504),
            Op::Heartbeat(0) => None,
            Op::Heartbeat(_) => Some(505),
            Op::UnknownMethod {
                class_id,
                method_id,
                ..
            } if !known_method(*class_id, *method_id) => Some(540),
            Op::Oversized { kind, size, .. } => {
                let limit = if *kind == 3 { fm } else { fm.max(4 << 20) };
                (*size as u64 + 8 > limit).then_some(501)
            }
            // The frame type is judged once 7 bytes are in.
            Op::Garbage(b) if b.len() >= 7 && ![1, 2, 3, 8].contains(&b[0]) => Some(501),
            Op::RawFrame { kind, .. } if ![1, 2, 3, 8].contains(kind) => Some(501),
            Op::RawFrame { end, .. } if *end != FRAME_END => Some(501),
            Op::Publish { .. } | Op::QosPrefetchSize(..) | Op::Reopen(_) => Some(504),
            _ => None,
        }
    }
}

/// The methods warren-protocol knows (a copy of its table, for expected codes).
fn known_method(class_id: u16, method_id: u16) -> bool {
    match class_id {
        10 => [10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61, 70, 71].contains(&method_id),
        20 => [10, 11, 20, 21, 40, 41].contains(&method_id),
        30 => [10, 11].contains(&method_id),
        40 => [10, 11, 20, 21, 30, 31, 40, 51].contains(&method_id),
        50 => [10, 11, 20, 21, 30, 31, 40, 41, 50, 51].contains(&method_id),
        60 => [
            10, 11, 20, 21, 30, 31, 40, 50, 60, 70, 71, 72, 80, 90, 100, 110, 111, 120,
        ]
        .contains(&method_id),
        85 => [10, 11].contains(&method_id),
        90 => [10, 11, 20, 21, 30, 31].contains(&method_id),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Running a case

/// What the server did in one case.
#[derive(Debug, Default)]
struct Seen {
    connection_closes: Vec<(u16, String)>,
    channel_closes: Vec<(u16, String)>,
    frames: usize,
    /// Basic methods received (deliver, get-ok, return, ack, nack, cancel), by name.
    basic: BTreeMap<&'static str, u64>,
    answered_header: bool,
    silent_end: bool,
}

fn basic_name(m: &basic::AMQPMethod) -> Option<&'static str> {
    use basic::AMQPMethod as B;
    Some(match m {
        B::Deliver(_) => "deliver",
        B::GetOk(_) => "get-ok",
        B::GetEmpty(_) => "get-empty",
        B::Return(_) => "return",
        B::Ack(_) => "ack",
        B::Nack(_) => "nack",
        B::Cancel(_) => "cancel",
        B::ConsumeOk(_) => "consume-ok",
        _ => return None,
    })
}

async fn run_case(addr: std::net::SocketAddr, case: &Case) -> Result<Seen, String> {
    let bytes = case.encode();
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut rd, mut wr) = s.into_split();
    let (half_close_tx, half_close_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let end = case.end;
    let writer = tokio::spawn(async move {
        // Several writes, so the server sees partial frames too.
        let mut ok = true;
        for chunk in bytes.chunks(1500) {
            if wr.write_all(chunk).await.is_err() {
                ok = false;
                break;
            }
        }
        if ok && end == End::CloseFrame {
            let mut v = Vec::new();
            method_frame(
                &mut v,
                0,
                &AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: 200,
                    reply_text: "bye".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            );
            let _ = wr.write_all(&v).await;
        }
        if end != End::HalfClose {
            // Keep the socket open until the reader asks for the half-close or is done.
            tokio::select! {
                _ = half_close_rx => {}
                _ = done_rx => {}
            }
        }
        let _ = wr.shutdown().await;
        wr
    });

    let mut seen = Seen::default();
    let d = Decoder::new(0);
    let mut buf = BytesMut::new();
    let mut half_close_tx = Some(half_close_tx);
    let mut silence_limit = match end {
        End::HalfClose => Duration::from_secs(6),
        End::CloseFrame | End::Silence => Duration::from_secs(2),
    };
    loop {
        match tokio::time::timeout(silence_limit, rd.read_buf(&mut buf)).await {
            Err(_) => match end {
                End::Silence => {
                    seen.silent_end = true;
                    break;
                }
                End::CloseFrame if half_close_tx.is_some() => {
                    // The server may be waiting for the rest of a frame: half-close, then it
                    // must go.
                    let _ = half_close_tx.take().map(|tx| tx.send(()));
                    silence_limit = Duration::from_secs(6);
                }
                _ => {
                    return Err(format!(
                        "hang: the socket is still open after {silence_limit:?} of silence \
                         following the client's half-close ({seen:?})"
                    ))
                }
            },
            Ok(Err(_)) | Ok(Ok(0)) => break,
            Ok(Ok(_)) => {}
        }
        if !seen.answered_header && seen.frames == 0 && buf.starts_with(b"AMQP") {
            if buf.len() < 8 {
                continue;
            }
            if buf[..8] != PROTOCOL_HEADER {
                return Err(format!("bad protocol header answer {:?}", &buf[..8]));
            }
            let _ = buf.split_to(8);
            seen.answered_header = true;
        }
        loop {
            match d.decode(&mut buf) {
                Ok(Some(f)) => {
                    seen.frames += 1;
                    if let Frame::Method {
                        class: AMQPClass::Basic(m),
                        ..
                    } = &f
                    {
                        if let Some(name) = basic_name(m) {
                            *seen.basic.entry(name).or_default() += 1;
                        }
                    }
                    match f {
                        Frame::Method {
                            class: AMQPClass::Connection(connection::AMQPMethod::Close(c)),
                            ..
                        } => {
                            seen.connection_closes
                                .push((c.reply_code, c.reply_text.to_string()));
                            // Let the server finish: half-close instead of answering close-ok.
                            if end == End::CloseFrame {
                                let _ = half_close_tx.take().map(|tx| tx.send(()));
                                silence_limit = Duration::from_secs(6);
                            }
                        }
                        Frame::Method {
                            class: AMQPClass::Channel(channel::AMQPMethod::Close(c)),
                            ..
                        } => seen
                            .channel_closes
                            .push((c.reply_code, c.reply_text.to_string())),
                        _ => {}
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(format!("the server sent an undecodable frame: {e}")),
            }
        }
    }
    let _ = done_tx.send(());
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(5), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    Ok(seen)
}

/// A fresh lapin connection declares a queue, publishes to it and gets the message back.
async fn healthy(b: &warren_broker::Running, n: u64) -> Result<(), String> {
    let work = async {
        let c = Connection::connect(&b.url(), ConnectionProperties::default())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let ch = c
            .create_channel()
            .await
            .map_err(|e| format!("channel: {e}"))?;
        ch.queue_declare(
            "fuzz-health".into(),
            QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .map_err(|e| format!("declare: {e}"))?;
        let body = n.to_be_bytes();
        ch.basic_publish(
            "".into(),
            "fuzz-health".into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .map_err(|e| format!("publish: {e}"))?;
        let got = ch
            .basic_get("fuzz-health".into(), BasicGetOptions { no_ack: true })
            .await
            .map_err(|e| format!("get: {e}"))?
            .ok_or("get: empty")?;
        if got.data != body {
            return Err(format!("get: {:?} instead of {:?}", got.data, body));
        }
        c.close(200, "ok".into())
            .await
            .map_err(|e| format!("close: {e}"))?;
        Ok::<(), String>(())
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| "health check timed out".to_string())?
}

fn check(case: &Case, seen: &Seen) -> Result<(), TestCaseError> {
    for (code, text) in &seen.connection_closes {
        prop_assert!(
            CONNECTION_CODES.contains(code),
            "connection.close with code {} ({})",
            code,
            text
        );
    }
    for (code, text) in &seen.channel_closes {
        prop_assert!(
            CHANNEL_CODES.contains(code),
            "channel.close with code {} ({})",
            code,
            text
        );
    }
    if let Some(want) = case.expected_first_close() {
        prop_assert!(
            seen.channel_closes.is_empty(),
            "expected connection.close {}, got channel.close {:?}",
            want,
            seen.channel_closes
        );
        prop_assert_eq!(
            seen.connection_closes.first().map(|c| c.0),
            Some(want),
            "first op {:?}: {:?}",
            case.ops.first(),
            seen.connection_closes
        );
    }
    if matches!(case.handshake.header, ProtoHeader::Wrong(_)) {
        let wrong = match &case.handshake.header {
            ProtoHeader::Wrong(b) => b.as_slice() != PROTOCOL_HEADER,
            _ => false,
        };
        if wrong {
            prop_assert!(seen.answered_header, "a wrong header was not answered");
            prop_assert_eq!(seen.frames, 0);
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Stats {
    cases: u64,
    connection_codes: BTreeMap<u16, u64>,
    channel_codes: BTreeMap<u16, u64>,
    expected_checked: u64,
    silent: u64,
    frames: u64,
    basic: BTreeMap<&'static str, u64>,
    slowest: Duration,
    /// Distinct close texts (numbers stripped), for the report.
    texts: BTreeMap<String, u64>,
}

#[test]
fn connection_survives_random_frame_sequences() {
    record_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let b = rt.block_on(common::broker_with(|c| {
        c.max_message_size = MAX_MESSAGE_SIZE
    }));
    let addr = b.addr;
    let stats = Mutex::new(Stats::default());
    let started = Instant::now();
    let mut runner = TestRunner::new(Config {
        cases: cases(64),
        failure_persistence: None,
        max_shrink_time: 120_000,
        ..Config::default()
    });
    let result = runner.run(&case(), |case| {
        let t0 = Instant::now();
        let seen = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(30), run_case(addr, &case)).await
            })
            .map_err(|_| TestCaseError::fail("hang: the case did not end within 30 s"))?
            .map_err(TestCaseError::fail)?;
        let panics = take_panics();
        prop_assert!(panics.is_empty(), "the broker panicked: {:?}", panics);
        check(&case, &seen)?;
        rt.block_on(healthy(&b, t0.elapsed().as_nanos() as u64))
            .map_err(|e| TestCaseError::fail(format!("broker unhealthy after the case: {e}")))?;
        let panics = take_panics();
        prop_assert!(panics.is_empty(), "the broker panicked: {:?}", panics);
        let mut s = stats.lock().unwrap();
        s.cases += 1;
        for (c, _) in &seen.connection_closes {
            *s.connection_codes.entry(*c).or_default() += 1;
        }
        for (c, _) in &seen.channel_closes {
            *s.channel_codes.entry(*c).or_default() += 1;
        }
        s.expected_checked += u64::from(case.expected_first_close().is_some());
        s.silent += u64::from(seen.silent_end);
        s.frames += seen.frames as u64;
        for (k, n) in &seen.basic {
            *s.basic.entry(k).or_default() += n;
        }
        for (c, t) in seen.connection_closes.iter().chain(&seen.channel_closes) {
            let t: String = t.chars().filter(|c| !c.is_ascii_digit()).take(90).collect();
            *s.texts.entry(format!("{c} {t}")).or_default() += 1;
        }
        s.slowest = s.slowest.max(t0.elapsed());
        Ok(())
    });
    rt.block_on(b.stop());
    let s = stats.into_inner().unwrap();
    println!(
        "fuzz_connection: {} cases in {:.1?} (slowest {:.1?}, {} silent ends, {} first-fault codes checked, \
         {} frames received, basic methods {:?}); connection.close codes {:?}; channel.close codes {:?}",
        s.cases,
        started.elapsed(),
        s.slowest,
        s.silent,
        s.expected_checked,
        s.frames,
        s.basic,
        s.connection_codes,
        s.channel_codes
    );
    if std::env::var_os("WARREN_FUZZ_TEXTS").is_some() {
        for (t, n) in &s.texts {
            println!("  {n:5} x {t}");
        }
    }
    if let Err(e) = result {
        panic!("{e}");
    }
}
