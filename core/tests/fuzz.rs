//! Fuzzing of the broker's pure decision code on stable Rust, with proptest: queue-argument
//! validation and decoding (`args::validate_queue_args`, `args::QueueArgs::parse`) and the
//! redeclare equivalence checks for queues and exchanges (`args::check_queue_args_equivalent`,
//! `args::check_equivalent`) on random field tables; topic matching (`topic::TopicTrie`)
//! against a reference matcher of RabbitMQ's semantics, with insert/remove round trips and long
//! keys; headers-exchange matching (`headers::x_match`, `headers::matches`).
//!
//! Invariants: nothing panics; every argument error is 406; what validates decodes to the
//! values given; topic matches equal the reference's (as a multiset) and stay polynomial on
//! keys of 128 words; headers matching keeps the properties its module documents.
//!
//! The default case counts run in seconds in a debug build (`cargo test -p warren-core
//! --test fuzz`). Run longer by hand with, e.g.:
//!
//! ```text
//! WARREN_FUZZ_CASES=200000 cargo test --release -p warren-core --test fuzz
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use warren_core::args::{self, Overflow, QueueArgs};
use warren_core::headers::{self, XMatch};
use warren_core::topic::TopicTrie;
use warren_protocol::{types::DecimalValue, AMQPValue, FieldTable, LongString, ShortString};

// ---------------------------------------------------------------------------------------------
// Configuration

/// Cases per property: `WARREN_FUZZ_CASES` if set, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("WARREN_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn config(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default),
        // Failing inputs are reported (shrunk) in the test output; no regression files are
        // written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Field values and tables

/// The queue arguments `args` knows, in its order.
const QUEUE_KEYS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-version",
    "x-single-active-consumer",
    "x-queue-type",
    "x-queue-master-locator",
    "x-delivery-limit",
    "x-consumer-timeout",
];

/// Keys the queue checks must ignore.
const OTHER_KEYS: &[&str] = &[
    "x-foo",
    "alternate-exchange",
    "x-delayed-type",
    "x-match",
    "x-priority",
    "",
];

/// RabbitMQ's largest TTL / expiry, as `args` bounds it.
const MAX_EXPIRY_MS: i64 = 315_360_000_000;

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Any value, NaN included when `nan`.
fn value(nan: bool) -> BoxedStrategy<AMQPValue> {
    let float = if nan {
        any::<f32>().boxed()
    } else {
        (-1e6f32..1e6).boxed()
    };
    let double = if nan {
        any::<f64>().boxed()
    } else {
        (-1e12f64..1e12).boxed()
    };
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        float.prop_map(AMQPValue::Float),
        double.prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        "[a-z0-9.-]{0,12}".prop_map(|s| AMQPValue::ShortString(ShortString::from(s))),
        "[a-z0-9.-]{0,12}".prop_map(|s| long(&s)),
        prop::collection::vec(any::<u8>(), 0..12).prop_map(|v| AMQPValue::LongString(v.into())),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        prop::collection::vec(any::<u8>(), 0..8).prop_map(|v| AMQPValue::ByteArray(v.into())),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3)
                .prop_map(|v| AMQPValue::FieldArray(v.into())),
            prop::collection::vec(("[a-z-]{0,6}", inner), 0..3).prop_map(|kv| {
                let mut t = FieldTable::default();
                for (k, v) in kv {
                    t.insert(k.into(), v);
                }
                AMQPValue::FieldTable(t)
            }),
        ]
    })
    .boxed()
}

/// Values chosen to sit on the argument rules' edges, plus any value at all.
fn arg_value() -> impl Strategy<Value = AMQPValue> {
    let ints = prop_oneof![
        Just(0i64),
        Just(1),
        Just(-1),
        Just(255),
        Just(256),
        Just(MAX_EXPIRY_MS),
        Just(MAX_EXPIRY_MS + 1),
        Just(i64::MAX),
        Just(i64::MIN),
        -1000i64..1000,
        any::<i64>(),
    ];
    let int_value = (ints, 0u8..7).prop_map(|(n, width)| int_as(n, width));
    let strings = prop_oneof![
        Just("drop-head".to_string()),
        Just("reject-publish".to_string()),
        Just("reject-publish-dlx".to_string()),
        Just("default".to_string()),
        Just("lazy".to_string()),
        Just("classic".to_string()),
        Just("quorum".to_string()),
        Just("stream".to_string()),
        Just("dlx".to_string()),
        Just(String::new()),
        Just("d".repeat(255)),
        Just("d".repeat(256)),
        "\\PC{0,12}",
    ];
    let string_value = (strings, any::<bool>()).prop_map(|(s, short)| match short {
        true if s.len() <= 255 => AMQPValue::ShortString(ShortString::from(s)),
        _ => long(&s),
    });
    prop_oneof![
        3 => int_value,
        3 => string_value,
        1 => any::<bool>().prop_map(AMQPValue::Boolean),
        2 => value(true),
    ]
}

/// `n` as an integer value of one of the seven widths, or as a long-long int when it does not
/// fit the chosen one.
fn int_as(n: i64, width: u8) -> AMQPValue {
    match width {
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

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(QUEUE_KEYS).prop_map(str::to_string),
        2 => prop::sample::select(OTHER_KEYS).prop_map(str::to_string),
        1 => "x-[a-z-]{0,10}",
    ]
}

fn arg_table() -> impl Strategy<Value = FieldTable> {
    prop::collection::vec((key(), arg_value()), 0..6).prop_map(|kv| {
        let mut t = FieldTable::default();
        for (k, v) in kv {
            t.insert(k.into(), v);
        }
        t
    })
}

fn without(t: &FieldTable, keep: impl Fn(&str) -> bool) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in t.inner() {
        if keep(k.as_str()) {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Topic reference matcher

/// RabbitMQ's word split (`rabbit_db_topic_exchange:split_topic_key_binary/1`): the empty key
/// has no words; otherwise every `.` separates two (possibly empty) words.
fn rmq_words(s: &str) -> Vec<&str> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split('.').collect()
    }
}

/// Does `pattern` match `key`? `*` is exactly one word, `#` zero or more, anything else the
/// same word. Dynamic programming over (pattern position, key position).
fn reference_match(pattern: &[&str], key: &[&str]) -> bool {
    let (p, k) = (pattern.len(), key.len());
    // m[i][j]: pattern[i..] matches key[j..].
    let mut m = vec![vec![false; k + 1]; p + 1];
    m[p][k] = true;
    for i in (0..p).rev() {
        for j in (0..=k).rev() {
            m[i][j] = match pattern[i] {
                "#" => m[i + 1][j] || (j < k && m[i][j + 1]),
                "*" => j < k && m[i + 1][j + 1],
                w => j < k && key[j] == w && m[i + 1][j + 1],
            };
        }
    }
    m[0][0]
}

fn pattern() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            3 => prop::sample::select(vec!["a", "b", "c"]),
            1 => Just(""),
            2 => Just("*"),
            3 => Just("#"),
        ],
        0..8,
    )
    .prop_map(|w| w.join("."))
}

/// A routing key: words from a small alphabet (the empty key included).
fn topic_key() -> impl Strategy<Value = String> {
    let word = prop_oneof![
        6 => prop::sample::select(vec!["a", "b", "c"]),
        1 => Just(""),
        1 => Just("*"),
        1 => Just("#"),
    ];
    prop_oneof![
        6 => prop::collection::vec(word.clone(), 1..10),
        1 => prop::collection::vec(word, 100..=128),
    ]
    .prop_map(|w| w.join("."))
}

/// The same pattern spelled differently: each `#` may become a run of `#` (`#.#` is `#`).
fn respell(pattern: &str, extra: &[u8]) -> String {
    let mut out = Vec::new();
    for (i, w) in pattern.split('.').enumerate() {
        out.push(w.to_string());
        if w == "#" {
            for _ in 0..extra.get(i).copied().unwrap_or(0) % 3 {
                out.push("#".into());
            }
        }
    }
    out.join(".")
}

fn trie_matches(t: &TopicTrie<usize>, key: &str) -> Vec<usize> {
    let mut v = Vec::new();
    t.matches(key, &mut v);
    v.sort_unstable();
    v
}

fn expected_matches(patterns: &[(usize, String)], key: &str) -> Vec<usize> {
    let k = rmq_words(key);
    let mut v: Vec<usize> = patterns
        .iter()
        .filter(|(_, p)| reference_match(&rmq_words(p), &k))
        .map(|(i, _)| *i)
        .collect();
    v.sort_unstable();
    v
}

fn dedup(mut v: Vec<usize>) -> Vec<usize> {
    v.dedup();
    v
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(config(2000))]

    /// Queue-argument validation never panics, every error is 406, unknown keys are never
    /// checked, and what validates decodes to the values given.
    #[test]
    fn queue_args_validate_and_parse(t in arg_table(), queue in "\\PC{0,10}", vhost in "\\PC{0,6}") {
        let r = args::validate_queue_args(&queue, &vhost, &t);
        let parsed = QueueArgs::parse(&t);
        let _ = parsed.bounded();
        for v in t.inner().values() {
            let _ = (args::render(v), args::type_name(v), args::as_int(v), args::as_str(v));
        }
        // Unknown keys change nothing.
        let known = without(&t, |k| QUEUE_KEYS.contains(&k));
        let r_known = args::validate_queue_args(&queue, &vhost, &known);
        prop_assert_eq!(&r, &r_known);
        let e = match r {
            Err(e) => e,
            Ok(()) => {
                check_parsed(&t, &parsed)?;
                return Ok(());
            }
        };
        prop_assert_eq!(e.code, 406, "{}", e);
        prop_assert!(!e.is_connection_error());
        prop_assert!(e.text.starts_with("invalid "), "{}", e.text);
        let _ = (e.reply_text(), e.close_method());
    }

    /// Redeclare equivalence for queues: reflexive, symmetric, 406 when refused, blind to keys
    /// it does not compare, integers equal across widths, an absent x-queue-type is classic.
    #[test]
    fn queue_args_equivalence(
        a in arg_table(),
        b in arg_table(),
        widths in prop::collection::vec(0u8..7, QUEUE_KEYS.len()),
    ) {
        prop_assert!(args::check_queue_args_equivalent("q", "/", &a, &a).is_ok());
        let ab = args::check_queue_args_equivalent("q", "/", &a, &b);
        let ba = args::check_queue_args_equivalent("q", "/", &b, &a);
        prop_assert_eq!(ab.is_ok(), ba.is_ok());
        if let Err(e) = &ab {
            prop_assert_eq!(e.code, 406);
            prop_assert!(e.text.starts_with("inequivalent arg '"), "{}", e.text);
        }
        let a_known = without(&a, |k| QUEUE_KEYS.contains(&k));
        let b_known = without(&b, |k| QUEUE_KEYS.contains(&k));
        prop_assert_eq!(&ab, &args::check_queue_args_equivalent("q", "/", &a_known, &b_known));
        // Every integer re-encoded in another width that holds it: still equivalent.
        let mut c = FieldTable::default();
        for (i, (k, v)) in a.inner().iter().enumerate() {
            let v = match args::as_int(v) {
                Some(n) => int_as(n, widths[i % widths.len()]),
                None => v.clone(),
            };
            c.insert(k.clone(), v);
        }
        prop_assert!(args::check_queue_args_equivalent("q", "/", &a, &c).is_ok());
        // x-queue-type absent and "classic" are the same.
        let classic = without(&a, |k| k != "x-queue-type");
        let mut explicit = classic.clone();
        explicit.insert("x-queue-type".into(), long("classic"));
        prop_assert!(args::check_queue_args_equivalent("q", "/", &classic, &explicit).is_ok());
    }

    /// The exchange redeclare check (`alternate-exchange`, `x-delayed-type`): reflexive,
    /// symmetric, 406 when refused.
    #[test]
    fn exchange_args_equivalence(
        a in prop::collection::vec(
            (prop::sample::select(vec!["alternate-exchange", "x-delayed-type", "x-foo"]), arg_value()),
            0..4,
        ),
        b in prop::collection::vec(
            (prop::sample::select(vec!["alternate-exchange", "x-delayed-type", "x-foo"]), arg_value()),
            0..4,
        ),
    ) {
        let table = |kv: Vec<(&str, AMQPValue)>| {
            let mut t = FieldTable::default();
            for (k, v) in kv {
                t.insert(k.into(), v);
            }
            t
        };
        let (a, b) = (table(a), table(b));
        let keys = ["alternate-exchange", "x-delayed-type"];
        let rs = "exchange 'x' in vhost '/'";
        prop_assert!(args::check_equivalent(rs, &keys, &a, &a).is_ok());
        let ab = args::check_equivalent(rs, &keys, &a, &b);
        prop_assert_eq!(ab.is_ok(), args::check_equivalent(rs, &keys, &b, &a).is_ok());
        if let Err(e) = ab {
            prop_assert_eq!(e.code, 406);
        }
    }

    /// Topic matching equals the reference, each binding's value once; removing bindings (by
    /// any spelling of their pattern) leaves exactly the others matching, and nothing at the end.
    #[test]
    fn topic_trie_matches_reference(
        patterns in prop::collection::vec(pattern(), 0..12),
        keys in prop::collection::vec(topic_key(), 1..8),
        order in prop::collection::vec(any::<Index>(), 0..12),
        respellings in prop::collection::vec(prop::collection::vec(any::<u8>(), 8), 12),
    ) {
        let mut t = TopicTrie::default();
        let mut live: Vec<(usize, String)> = Vec::new();
        for (i, p) in patterns.iter().enumerate() {
            t.insert(p, i);
            live.push((i, p.clone()));
        }
        let check = |t: &TopicTrie<usize>, live: &[(usize, String)]| -> Result<(), TestCaseError> {
            for k in &keys {
                let start = Instant::now();
                let got = trie_matches(t, k);
                prop_assert!(start.elapsed() < Duration::from_secs(2), "slow match of {:?}", k);
                let want = expected_matches(live, k);
                prop_assert_eq!(dedup(got.clone()), dedup(want.clone()), "key {:?} patterns {:?}", k, live);
                prop_assert_eq!(got, want, "multiset: key {:?} patterns {:?}", k, live);
            }
            Ok(())
        };
        check(&t, &live)?;
        // Remove in a random order, each by a respelled pattern, checking as we go.
        let mut step = 0;
        while !live.is_empty() {
            let at = order.get(step).map_or(0, |i| i.index(live.len()));
            let (i, p) = live.remove(at);
            let spelled = respell(&p, &respellings[step % respellings.len()]);
            prop_assert!(t.remove(&spelled, &i), "remove {:?} (as {:?}) = {}", p, spelled, i);
            prop_assert!(!t.remove(&p, &i), "removed twice: {:?}", p);
            step += 1;
            if step % 3 == 0 || live.is_empty() {
                check(&t, &live)?;
            }
        }
        for k in keys.iter().map(String::as_str).chain(["a", "", "#", "a.b.c", "."]) {
            prop_assert!(trie_matches(&t, k).is_empty(), "{:?} still matches", k);
        }
    }

    /// Many `#` and `*` against keys of up to 128 words: the same answers, without blow-up.
    #[test]
    fn topic_trie_long_keys(
        patterns in prop::collection::vec(
            prop::collection::vec(
                prop_oneof![4 => Just("#"), 2 => Just("*"), 1 => Just("a"), 1 => Just("b")],
                1..24,
            )
            .prop_map(|w| w.join(".")),
            1..6,
        ),
        key in prop::collection::vec(prop_oneof![5 => Just("a"), 1 => Just("b")], 64..=128)
            .prop_map(|w| w.join(".")),
    ) {
        let mut t = TopicTrie::default();
        let live: Vec<(usize, String)> = patterns.iter().cloned().enumerate().collect();
        for (i, p) in &live {
            t.insert(p, *i);
        }
        let start = Instant::now();
        let got = trie_matches(&t, &key);
        prop_assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
        prop_assert_eq!(got, expected_matches(&live, &key));
    }

    /// Arbitrary text as patterns and keys: never panics, and removal round-trips.
    #[test]
    fn topic_trie_arbitrary_text(
        patterns in prop::collection::vec("[a#*.\\PC]{0,16}", 0..8),
        keys in prop::collection::vec("[a#*.\\PC]{0,16}", 0..8),
    ) {
        let mut t = TopicTrie::default();
        for (i, p) in patterns.iter().enumerate() {
            t.insert(p, i);
        }
        for k in &keys {
            let _ = trie_matches(&t, k);
        }
        for (i, p) in patterns.iter().enumerate() {
            prop_assert!(t.remove(p, &i));
        }
        for k in &keys {
            prop_assert!(trie_matches(&t, k).is_empty());
        }
    }

    /// `x-match`: only all, any, all-with-x, any-with-x (as a long or short string) or absent;
    /// anything else is 406.
    #[test]
    fn headers_x_match(
        t in prop::collection::vec(
            (
                prop_oneof![3 => Just("x-match".to_string()), 1 => "[a-z-]{0,8}"],
                prop_oneof![
                    prop::sample::select(vec!["all", "any", "all-with-x", "any-with-x", "ALL", "some", ""])
                        .prop_flat_map(|s| prop_oneof![
                            Just(long(s)),
                            Just(AMQPValue::ShortString(s.into())),
                        ]),
                    value(true),
                ],
            ),
            0..3,
        ),
    ) {
        let mut args = FieldTable::default();
        for (k, v) in t {
            args.insert(k.into(), v);
        }
        let want = match args.inner().get("x-match") {
            None => Some(XMatch::All),
            Some(v) => match args::as_str(v).as_deref() {
                Some("all") => Some(XMatch::All),
                Some("any") => Some(XMatch::Any),
                Some("all-with-x") => Some(XMatch::AllWithX),
                Some("any-with-x") => Some(XMatch::AnyWithX),
                _ => None,
            },
        };
        match headers::x_match(&args) {
            Ok(m) => prop_assert_eq!(Some(m), want),
            Err(e) => {
                prop_assert_eq!(want, None);
                prop_assert_eq!(e.code, 406);
            }
        }
    }

    /// Headers matching on random tables: no panic; no headers is an empty table; all is
    /// vacuously true and any false on a binding with nothing to compare; a message carrying
    /// the binding's pairs matches under every mode (when any has something to compare); one
    /// missing a compared key fails all; a void binding value matches on presence; integers
    /// match across widths; headers the binding does not name change nothing.
    #[test]
    fn headers_matching(
        mode in prop::sample::select(vec![XMatch::All, XMatch::Any, XMatch::AllWithX, XMatch::AnyWithX]),
        binding in prop::collection::vec(
            (prop_oneof!["[a-c]{1,2}", "x-[a-c]{1,2}", Just("x-match".to_string())], value(false)),
            0..5,
        ),
        extra in prop::collection::vec(("[d-f]{1,2}", value(true)), 0..4),
        noise in prop::collection::vec(("[a-c]{1,2}", value(true)), 0..4),
        gone_at in any::<Index>(),
        widths in prop::collection::vec(0u8..7, 5),
    ) {
        let mut args = FieldTable::default();
        for (k, v) in &binding {
            args.insert(k.as_str().into(), v.clone());
        }
        let with_x = matches!(mode, XMatch::AllWithX | XMatch::AnyWithX);
        let all = matches!(mode, XMatch::All | XMatch::AllWithX);
        let compared: Vec<&str> = args
            .inner()
            .keys()
            .map(ShortString::as_str)
            .filter(|k| *k != "x-match" && (with_x || !k.starts_with("x-")))
            .collect();

        // Random headers: never panics; None is the empty table.
        let mut random = FieldTable::default();
        for (k, v) in &noise {
            random.insert(k.as_str().into(), v.clone());
        }
        let _ = headers::matches(mode, &args, Some(&random));
        prop_assert_eq!(
            headers::matches(mode, &args, None),
            headers::matches(mode, &args, Some(&FieldTable::default()))
        );
        if compared.is_empty() {
            prop_assert_eq!(headers::matches(mode, &args, Some(&random)), all);
            prop_assert_eq!(headers::matches(mode, &args, None), all);
            return Ok(());
        }

        // The binding's own pairs plus unrelated headers.
        let mut carrying = args.clone();
        for (k, v) in &extra {
            carrying.insert(k.as_str().into(), v.clone());
        }
        prop_assert!(headers::matches(mode, &args, Some(&carrying)));
        // Integers in another width, and any value where the binding holds void.
        let mut rewidened = FieldTable::default();
        for (i, (k, v)) in args.inner().iter().enumerate() {
            let v = match (v, args::as_int(v)) {
                (AMQPValue::Void, _) => long("present"),
                (AMQPValue::Timestamp(_), _) | (_, None) => v.clone(),
                (_, Some(n)) => int_as(n, widths[i % widths.len()]),
            };
            rewidened.insert(k.clone(), v);
        }
        prop_assert!(headers::matches(mode, &args, Some(&rewidened)));
        // Drop one compared key: all fails; any still matches while another compared key is there.
        let gone = compared[gone_at.index(compared.len())];
        let missing = without(&carrying, |k| k != gone);
        prop_assert_eq!(headers::matches(mode, &args, Some(&missing)), !all && compared.len() > 1);
        // Headers the binding does not name change nothing.
        let base = headers::matches(mode, &args, Some(&random));
        let mut more = random.clone();
        for (k, v) in &extra {
            more.insert(k.as_str().into(), v.clone());
        }
        prop_assert_eq!(headers::matches(mode, &args, Some(&more)), base);
    }
}

/// What a validated table decodes to.
fn check_parsed(t: &FieldTable, p: &QueueArgs) -> Result<(), TestCaseError> {
    let get = |k: &str| t.inner().get(k);
    let int = |k: &str| get(k).and_then(args::as_int).map(|n| n as u64);
    let string = |k: &str| get(k).and_then(args::as_str);
    prop_assert_eq!(p.message_ttl, int("x-message-ttl"));
    prop_assert_eq!(p.expires, int("x-expires"));
    prop_assert_eq!(p.max_length, int("x-max-length"));
    prop_assert_eq!(p.max_length_bytes, int("x-max-length-bytes"));
    prop_assert_eq!(p.delivery_limit, int("x-delivery-limit"));
    prop_assert_eq!(p.consumer_timeout, int("x-consumer-timeout"));
    prop_assert_eq!(p.max_priority as u64, int("x-max-priority").unwrap_or(0));
    prop_assert_eq!(
        p.dead_letter_exchange.clone(),
        string("x-dead-letter-exchange")
    );
    prop_assert_eq!(
        p.dead_letter_routing_key.clone(),
        string("x-dead-letter-routing-key")
    );
    if let Some(dlx) = &p.dead_letter_exchange {
        prop_assert!(dlx.len() <= 255);
    }
    let overflow = match string("x-overflow").as_deref() {
        None | Some("drop-head") => Overflow::DropHead,
        Some("reject-publish") => Overflow::RejectPublish,
        Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
        Some(other) => {
            return Err(TestCaseError::fail(format!(
                "x-overflow {other:?} validated"
            )))
        }
    };
    prop_assert_eq!(p.overflow, overflow);
    prop_assert_eq!(
        p.single_active_consumer,
        matches!(
            get("x-single-active-consumer"),
            Some(AMQPValue::Boolean(true))
        )
    );
    prop_assert_eq!(
        p.quorum,
        string("x-queue-type").as_deref() == Some("quorum")
    );
    prop_assert_eq!(
        p.bounded(),
        p.max_length.is_some() || p.max_length_bytes.is_some()
    );
    Ok(())
}

/// The bounds the validator applies, checked once by hand so the property above is not
/// vacuous (every edge value of `arg_value` both passes and fails somewhere).
#[test]
fn queue_args_edges() {
    let one = |k: &str, v: AMQPValue| {
        let mut t = FieldTable::default();
        t.insert(k.into(), v);
        args::validate_queue_args("q", "/", &t)
    };
    assert!(one("x-expires", AMQPValue::LongLongInt(MAX_EXPIRY_MS)).is_ok());
    assert!(one("x-expires", AMQPValue::LongLongInt(MAX_EXPIRY_MS + 1)).is_err());
    assert!(one("x-expires", AMQPValue::ShortShortUInt(0)).is_err());
    assert!(one("x-message-ttl", AMQPValue::ShortShortUInt(0)).is_ok());
    assert!(one("x-max-priority", AMQPValue::ShortUInt(255)).is_ok());
    assert!(one("x-max-priority", AMQPValue::ShortUInt(256)).is_err());
    assert!(one("x-dead-letter-exchange", long(&"d".repeat(255))).is_ok());
    assert!(one("x-dead-letter-exchange", long(&"d".repeat(256))).is_err());
    assert!(one("x-queue-type", long("stream")).is_err());
}

/// RabbitMQ splits the empty routing key into no words
/// (`rabbit_db_topic_exchange:split_topic_key_binary(<<>>) -> []`), so a binding that needs a
/// word (`*`, `#.*`, `*.#`) does not match it there; Warren splits it into one empty word
/// (`key.split('.')` in `TopicTrie::matches`, broker/src/topic.rs:72) and matches. The unit
/// test `hash_edge_cases` (broker/src/topic.rs:198) asserts Warren's behaviour. A fix must give
/// the empty binding key no words too (`pattern_words`, topic.rs:81), or `""` stops matching `""`.
#[test]
fn empty_key_matches_no_one_word_pattern() {
    let mut t = TopicTrie::default();
    for (i, p) in ["*", "#.*", "*.#", "#", ""].iter().enumerate() {
        t.insert(p, i);
    }
    let live: Vec<(usize, String)> = ["*", "#.*", "*.#", "#", ""]
        .iter()
        .enumerate()
        .map(|(i, p)| (i, p.to_string()))
        .collect();
    // RabbitMQ: "#" (3) and "" (4) only.
    assert_eq!(expected_matches(&live, ""), vec![3, 4]);
    assert_eq!(trie_matches(&t, ""), vec![3, 4]);
}
