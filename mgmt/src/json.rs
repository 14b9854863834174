//! JSON as RabbitMQ's management API writes it: AMQP field tables to and from JSON objects,
//! `message_stats` with `*_details.rate`, timestamps, and list answers with RabbitMQ's
//! pagination, filtering, sorting and column selection.

use serde_json::{json, Map, Value};
use warren_protocol::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

use crate::http::{ApiError, ApiResult};

/// An AMQP value as RabbitMQ renders it in JSON.
pub fn value_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => {
            json!(d.value as f64 / 10f64.powi(d.scale as i32))
        }
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::ByteArray(b) => json!(String::from_utf8_lossy(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

pub fn table_to_json(t: &FieldTable) -> Value {
    let mut m = Map::new();
    for (k, v) in t.inner() {
        m.insert(k.as_str().to_string(), value_to_json(v));
    }
    Value::Object(m)
}

/// A JSON value as an AMQP value, as RabbitMQ converts declare arguments: integers become
/// signed 64-bit, strings long strings, objects tables, arrays arrays.
pub fn json_to_value(v: &Value) -> ApiResult<AMQPValue> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(a) => {
            let mut out = FieldArray::default();
            for x in a {
                out.push(json_to_value(x)?);
            }
            AMQPValue::FieldArray(out)
        }
        Value::Object(_) => AMQPValue::FieldTable(json_to_table(v)?),
    })
}

pub fn json_to_table(v: &Value) -> ApiResult<FieldTable> {
    let mut t = FieldTable::default();
    match v {
        Value::Null => {}
        Value::Object(m) => {
            for (k, x) in m {
                if k.len() > 255 {
                    return Err(ApiError::bad_request(format!(
                        "argument name longer than 255 bytes: {}...",
                        &k[..k.floor_char_boundary(32)]
                    )));
                }
                t.insert(ShortString::from(k.as_str()), json_to_value(x)?);
            }
        }
        _ => return Err(ApiError::bad_request("arguments must be an object")),
    }
    Ok(t)
}

/// `{"rate": r}`
pub fn details(rate: f64) -> Value {
    json!({ "rate": (rate * 10.0).round() / 10.0 })
}

/// `message_stats` from counters: each counter and its `*_details`, plus `deliver_get` (all
/// deliveries and gets) as RabbitMQ adds it.
pub fn message_stats(
    each: impl FnOnce(&mut dyn FnMut(&'static str, &warren_core::stats::Counter)),
) -> Value {
    let mut m = Map::new();
    let (mut dg, mut dg_rate) = (0u64, 0f64);
    each(&mut |k, c| {
        if matches!(k, "deliver" | "deliver_no_ack" | "get" | "get_no_ack") {
            dg += c.get();
            dg_rate += c.rate();
        }
        m.insert(k.to_string(), json!(c.get()));
        m.insert(format!("{k}_details"), details(c.rate()));
    });
    if m.contains_key("deliver") {
        m.insert("deliver_get".into(), json!(dg));
        m.insert("deliver_get_details".into(), details(dg_rate));
    }
    Value::Object(m)
}

/// "2026-11-30 17:55:00" (UTC), RabbitMQ's `idle_since` format.
pub fn rabbit_time(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(days);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A list's `name` filter.
pub type NameFilter = Box<dyn Fn(&str) -> bool + Send>;

/// RabbitMQ's list query parameters.
#[derive(Debug, Default, Clone)]
pub struct ListQuery {
    pub page: Option<usize>,
    pub page_size: usize,
    pub name: Option<String>,
    pub use_regex: bool,
    pub sort: Option<String>,
    pub sort_reverse: bool,
    pub columns: Option<Vec<String>>,
}

pub const MAX_PAGE_SIZE: usize = 500;

impl ListQuery {
    /// RabbitMQ's rules: pagination (with `page_size`, `name` and `use_regex`) applies only
    /// when `page` is given; `sort`, `sort_reverse` and `columns` apply always.
    pub fn parse(q: &std::collections::HashMap<String, String>) -> ApiResult<ListQuery> {
        let truthy = |k: &str| q.get(k).is_some_and(|v| v == "true");
        let mut out = ListQuery {
            page: None,
            page_size: 100,
            name: None,
            use_regex: false,
            sort: q.get("sort").filter(|s| !s.is_empty()).cloned(),
            sort_reverse: truthy("sort_reverse"),
            columns: q.get("columns").map(|c| {
                c.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }),
        };
        let Some(p) = q.get("page") else {
            return Ok(out);
        };
        let page: usize = p
            .parse()
            .map_err(|_| ApiError::bad_request("Pagination parameters are invalid"))?;
        let size = q.get("page_size");
        let page_size: Option<usize> = match size {
            None => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| ApiError::bad_request("Pagination parameters are invalid"))?,
            ),
        };
        let shown = |v: Option<usize>| v.map_or("undefined".to_string(), |n| n.to_string());
        if page == 0 || page_size.is_some_and(|n| n == 0 || n > MAX_PAGE_SIZE) {
            return Err(ApiError::pagination(format!(
                "Invalid pagination parameters: page number {page}, page size {}",
                shown(page_size)
            )));
        }
        out.page = Some(page);
        out.page_size = page_size.unwrap_or(100);
        out.name = q.get("name").filter(|n| !n.is_empty()).cloned();
        out.use_regex = truthy("use_regex");
        Ok(out)
    }

    /// The name filter as a predicate (a substring, or a regex with `use_regex=true`).
    pub fn name_filter(&self) -> ApiResult<Option<NameFilter>> {
        let Some(n) = &self.name else {
            return Ok(None);
        };
        if self.use_regex {
            let re = regex::RegexBuilder::new(n)
                .size_limit(1 << 20)
                .build()
                .map_err(|_| ApiError::bad_request("Pagination parameters are invalid"))?;
            Ok(Some(Box::new(move |s: &str| re.is_match(s))))
        } else {
            let needle = n.to_lowercase();
            Ok(Some(Box::new(move |s: &str| {
                s.to_lowercase().contains(&needle)
            })))
        }
    }
}

/// A value at a dotted path ("message_stats.publish_details.rate").
fn at_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn compare(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    use std::cmp::Ordering::*;
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .unwrap_or(0.0)
            .partial_cmp(&y.as_f64().unwrap_or(0.0))
            .unwrap_or(Equal),
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        (None, Some(_)) | (Some(Value::Null), Some(_)) => Less,
        (Some(_), None) | (Some(_), Some(Value::Null)) => Greater,
        _ => Equal,
    }
}

/// Keeps only the listed columns (dotted paths keep nested members).
fn select_columns(v: Value, columns: &[String]) -> Value {
    let mut out = Map::new();
    for c in columns {
        if let Some(x) = at_path(&v, c) {
            let parts: Vec<&str> = c.split('.').collect();
            put_path(&mut out, &parts, x.clone());
        }
    }
    Value::Object(out)
}

fn put_path(m: &mut Map<String, Value>, parts: &[&str], x: Value) {
    match parts {
        [] => {}
        [last] => {
            m.insert(last.to_string(), x);
        }
        [first, rest @ ..] => {
            let e = m
                .entry(first.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !e.is_object() {
                *e = Value::Object(Map::new());
            }
            if let Value::Object(inner) = e {
                put_path(inner, rest, x);
            }
        }
    }
}

/// Answers a list as RabbitMQ does. `items` are (name, make) pairs so that only the page's
/// items are rendered when no sort or filter needs every item's JSON.
pub fn answer<F>(q: &ListQuery, items: Vec<(String, F)>) -> ApiResult<Value>
where
    F: FnOnce() -> Value,
{
    answer_by(q, items, |(n, _)| n.as_str(), |(_, f)| f(), |_, _| None)
}

/// `answer` over any items: `name` gives an item's name (for the filter and the default sort),
/// `render` its JSON, and `sort_value` the value of a sort field when the caller can read it
/// without rendering (None: every item is rendered to sort). The order is computed over
/// indices; only the positions up to the page's end are selected (in linear time) and sorted,
/// and only the page's items are rendered: with 100,000 queues a page of 500 renders 500.
pub fn answer_by<T>(
    q: &ListQuery,
    mut items: Vec<T>,
    name: impl Fn(&T) -> &str,
    render: impl Fn(T) -> Value,
    sort_value: impl Fn(&T, &str) -> Option<Value>,
) -> ApiResult<Value> {
    let total = items.len();
    if let Some(keep) = q.name_filter()? {
        items.retain(|t| keep(name(t)));
    }
    let filtered = items.len();
    let field = q.sort.as_deref().filter(|s| *s != "name");
    // Sort keys besides the name: read directly, or from the rendered item (kept for the page).
    let mut rendered: Vec<Option<Value>> = Vec::new();
    let keys: Vec<Value> = match field {
        None => Vec::new(),
        Some(f) if items.first().is_some_and(|t| sort_value(t, f).is_some()) => items
            .iter()
            .map(|t| sort_value(t, f).unwrap_or(Value::Null))
            .collect(),
        Some(f) => {
            let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
            rendered = slots
                .iter_mut()
                .filter_map(Option::take)
                .map(&render)
                .map(Some)
                .collect();
            items = Vec::new();
            rendered
                .iter()
                .map(|v| {
                    v.as_ref()
                        .and_then(|v| at_path(v, f))
                        .cloned()
                        .unwrap_or(Value::Null)
                })
                .collect()
        }
    };
    let label = |i: usize| -> &str {
        match (items.get(i), rendered.get(i)) {
            (Some(t), _) => name(t),
            (None, Some(Some(v))) => v.get("name").and_then(Value::as_str).unwrap_or(""),
            _ => "",
        }
    };
    // Ties keep the items' order (the same name in several vhosts, in vhost order).
    let order = |a: &usize, b: &usize| {
        let o = match keys.is_empty() {
            true => std::cmp::Ordering::Equal,
            false => compare(keys.get(*a), keys.get(*b)),
        }
        .then_with(|| label(*a).cmp(label(*b)))
        .then(a.cmp(b));
        if q.sort_reverse {
            o.reverse()
        } else {
            o
        }
    };
    let (start, end) = match q.page {
        Some(page) => {
            let start = (page - 1).saturating_mul(q.page_size).min(filtered);
            (start, start.saturating_add(q.page_size).min(filtered))
        }
        None => (0, filtered),
    };
    let mut idx: Vec<usize> = (0..filtered).collect();
    if end < filtered && end > 0 {
        idx.select_nth_unstable_by(end - 1, order);
        idx.truncate(end);
    }
    idx.sort_unstable_by(order);
    let chosen: Vec<usize> = idx.get(start..).unwrap_or_default().to_vec();
    let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
    let page_items: Vec<Value> = chosen
        .into_iter()
        .filter_map(|i| match rendered.get_mut(i) {
            Some(v) => v.take(),
            None => slots.get_mut(i).and_then(Option::take).map(&render),
        })
        .collect();
    let paged = q.page.is_some();
    let page_items: Vec<Value> = match &q.columns {
        Some(c) => page_items
            .into_iter()
            .map(|v| select_columns(v, c))
            .collect(),
        None => page_items,
    };
    if !paged {
        return Ok(Value::Array(page_items));
    }
    let page = q.page.unwrap_or(1);
    let page_count = filtered.div_ceil(q.page_size).max(1);
    if page > page_count && filtered > 0 {
        return Err(ApiError {
            status: axum::http::StatusCode::BAD_REQUEST,
            error: "page_out_of_range".into(),
            reason: format!(
                "Page out of range, page: {page} page size: {}, len: {filtered}",
                q.page_size
            ),
            reason_term: None,
        });
    }
    Ok(json!({
        "filtered_count": filtered,
        "item_count": page_items.len(),
        "items": page_items,
        "page": page,
        "page_count": page_count,
        "page_size": q.page_size,
        "total_count": total,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_round_trip_through_json() {
        let v = json!({"x-max-length": 10, "x-dead-letter-exchange": "dlx", "flag": true,
                       "nested": {"a": [1, "b"]}});
        let t = json_to_table(&v).unwrap();
        assert_eq!(table_to_json(&t), v);
        assert!(json_to_table(&json!([1])).is_err());
    }

    #[test]
    fn times_print_as_rabbitmq() {
        assert_eq!(rabbit_time(0), "1970-01-01 00:00:00");
        assert_eq!(rabbit_time(1_795_996_800_000), "2026-11-30 00:00:00");
    }

    fn q(pairs: &[(&str, &str)]) -> ListQuery {
        ListQuery::parse(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap()
    }

    fn items(n: usize) -> Vec<(String, impl FnOnce() -> Value)> {
        (0..n)
            .map(|i| {
                let name = format!("q{i:03}");
                let n2 = name.clone();
                (name, move || json!({"name": n2, "messages": i % 7}))
            })
            .collect()
    }

    #[test]
    fn sorting_on_a_field_read_without_rendering_matches_rendered_sorting() {
        let items: Vec<(String, u64)> = (0..50)
            .map(|i| (format!("q{i:02}"), (i * 7) % 11))
            .collect();
        let render = |(n, m): (String, u64)| json!({"name": n, "messages": m});
        let fast = |t: &(String, u64), k: &str| (k == "messages").then(|| json!(t.1));
        for rev in ["false", "true"] {
            let lq = q(&[
                ("page", "2"),
                ("page_size", "7"),
                ("sort", "messages"),
                ("sort_reverse", rev),
            ]);
            let a = answer_by(&lq, items.clone(), |t| t.0.as_str(), render, fast).unwrap();
            let b = answer_by(&lq, items.clone(), |t| t.0.as_str(), render, |_, _| None).unwrap();
            assert_eq!(a, b);
        }
        // Sorted by name, a page is the same whether selected or fully sorted.
        let lq = q(&[("page", "3"), ("page_size", "9"), ("sort_reverse", "true")]);
        let a = answer_by(&lq, items.clone(), |t| t.0.as_str(), render, |_, _| None).unwrap();
        assert_eq!(a["items"][0]["name"], "q31");
    }

    #[test]
    fn pages_filters_sorts_and_columns() {
        let a = answer(&q(&[("page", "2"), ("page_size", "10")]), items(25)).unwrap();
        assert_eq!(a["total_count"], 25);
        assert_eq!(a["page_count"], 3);
        assert_eq!(a["item_count"], 10);
        assert_eq!(a["items"][0]["name"], "q010");
        let a = answer(
            &q(&[
                ("page", "1"),
                ("name", "q01"),
                ("sort", "messages"),
                ("sort_reverse", "true"),
                ("columns", "name"),
            ]),
            items(25),
        )
        .unwrap();
        assert_eq!(a["filtered_count"], 10);
        assert_eq!(a["items"][0], json!({"name": "q013"}));
        assert!(answer(&q(&[("page", "9")]), items(25)).is_err());
        assert!(ListQuery::parse(
            &[
                ("page".to_string(), "1".to_string()),
                ("page_size".to_string(), "501".to_string())
            ]
            .into()
        )
        .is_err());
        let plain = answer(&q(&[]), items(3)).unwrap();
        assert_eq!(plain.as_array().map(|a| a.len()), Some(3));
        let re = answer(
            &q(&[("page", "1"), ("name", "^q00[12]$"), ("use_regex", "true")]),
            items(25),
        )
        .unwrap();
        assert_eq!(re["filtered_count"], 2);
        assert!(q(&[("page", "1"), ("name", "("), ("use_regex", "true")])
            .name_filter()
            .is_err());
        // Without page, name and page_size are ignored (RabbitMQ's rule).
        let all = answer(&q(&[("name", "q001"), ("page_size", "600")]), items(25)).unwrap();
        assert_eq!(all.as_array().map(|a| a.len()), Some(25));
    }
}
