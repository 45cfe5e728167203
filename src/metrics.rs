//! Process-wide metrics, rendered in the Prometheus text format (version 0.0.4) for
//! `GET /v1/metrics`.
//!
//! Recording is a few atomic adds on paths that already do far more (a request, a group
//! flush, an audit batch); the label sets are fixed by the code (route patterns, methods,
//! status codes), never by a caller: no id, no card data, no header value ever becomes a
//! label. Values computed at scrape time (sealed state, key counts, certificate deadlines) are
//! handed to [`render`] by the caller.
//!
//! Depends on nothing else in the crate, so every layer may record into it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

/// Upper bounds (seconds) of the latency buckets: 100 µs to 5 s.
const SECONDS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Upper bounds of the group-size buckets (writes made durable by one flush).
const SIZES: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// A histogram with fixed buckets; the sum is kept in millionths of the unit, so it can be an
/// atomic integer.
struct Histogram {
    bounds: &'static [f64],
    /// Observations at or below each bound (not cumulative: summed when rendered).
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: f64) {
        if let Some(bucket) = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .and_then(|i| self.buckets.get(i))
        {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        // Saturating: a sum in millionths overflows after ~584,000 years of latency.
        let micros = (value * 1e6).round().clamp(0.0, u64::MAX as f64) as u64;
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// `NAME_bucket`, `NAME_sum` and `NAME_count` lines, with `labels` (already rendered,
    /// possibly empty) on each.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0u64;
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        // A scrape racing an observation may see its bucket before its count.
        let count = self.count.load(Ordering::Relaxed).max(cumulative);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// One route pattern and method: its latencies, and its answers by status.
struct RouteStats {
    latency: Histogram,
    statuses: RwLock<BTreeMap<u16, Arc<AtomicU64>>>,
}

/// Request metrics by (route pattern, method). A request costs two map lookups under read
/// locks and a few atomic adds; a write lock only the first time a label set is seen.
#[derive(Default)]
struct Requests {
    routes: RwLock<BTreeMap<(String, &'static str), Arc<RouteStats>>>,
}

struct Metrics {
    requests: Requests,
    flush_seconds: Histogram,
    flush_group: Histogram,
    audit_write_seconds: Histogram,
    audit_backlog: AtomicU64,
    handshake_failures: AtomicU64,
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics {
        requests: Requests::default(),
        flush_seconds: Histogram::new(&SECONDS),
        flush_group: Histogram::new(&SIZES),
        audit_write_seconds: Histogram::new(&SECONDS),
        audit_backlog: AtomicU64::new(0),
        handshake_failures: AtomicU64::new(0),
    })
}

/// Gets or makes the entry for `key`: a read lock on the common path, a write lock the first
/// time a label set is seen (the sets are few and fixed by the code).
fn entry<K: Ord + Clone, V>(
    map: &RwLock<BTreeMap<K, Arc<V>>>,
    key: &K,
    make: impl FnOnce() -> V,
) -> Arc<V> {
    if let Some(v) = map.read().unwrap_or_else(|p| p.into_inner()).get(key) {
        return Arc::clone(v);
    }
    Arc::clone(
        map.write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_insert_with(|| Arc::new(make())),
    )
}

/// One HTTP request answered: its route pattern (never the raw path), its method (one of a
/// fixed set, chosen by the caller of this function) and status.
pub fn request(route: String, method: &'static str, status: u16, latency: Duration) {
    let stats = entry(&metrics().requests.routes, &(route, method), || {
        RouteStats {
            latency: Histogram::new(&SECONDS),
            statuses: RwLock::default(),
        }
    });
    stats.latency.observe(latency.as_secs_f64());
    entry(&stats.statuses, &status, || AtomicU64::new(0)).fetch_add(1, Ordering::Relaxed);
}

/// One group flush of the store (sled flush and fdatasync) that made `writes` durable.
pub fn store_flush(took: Duration, writes: u64) {
    let m = metrics();
    m.flush_seconds.observe(took.as_secs_f64());
    m.flush_group.observe(writes as f64);
}

/// One batch of audit lines written; `backlog` lines were waiting when it was taken.
pub fn audit_write(took: Duration, backlog: u64) {
    let m = metrics();
    m.audit_write_seconds.observe(took.as_secs_f64());
    m.audit_backlog.store(backlog, Ordering::Relaxed);
}

/// One TLS handshake that failed.
pub fn handshake_failed() {
    metrics().handshake_failures.fetch_add(1, Ordering::Relaxed);
}

/// `(project, DEK version, state, seals made, seals allowed before automatic rotation)`.
pub type Dek = (String, u32, String, u64, u64);

/// What only the caller knows at scrape time.
#[derive(Default)]
pub struct Snapshot {
    pub sealed: bool,
    pub ready: bool,
    pub deks: Vec<Dek>,
    /// `(kind, subject, Unix seconds)`: when each certificate or CRL runs out.
    pub tls_deadlines: Vec<(&'static str, String, i64)>,
    /// `(kind, records)`, approximate.
    pub records: Vec<(&'static str, u64)>,
    /// Unix seconds now.
    pub now: i64,
    /// Nodes serving this store (this one included) and whether this one leads.
    pub nodes: usize,
    pub leader: bool,
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A metric with one unlabelled sample.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// The whole exposition.
pub fn render(snapshot: &Snapshot) -> String {
    let m = metrics();
    let mut out = String::new();

    header(
        &mut out,
        "cardvault_http_requests_total",
        "counter",
        "Requests answered, by route pattern, method and status.",
    );
    let routes: Vec<((String, &str), Arc<RouteStats>)> = m
        .requests
        .routes
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), Arc::clone(v)))
        .collect();
    for ((route, method), stats) in &routes {
        for (status, n) in stats
            .statuses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "cardvault_http_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {}",
                escape(route),
                escape(method),
                n.load(Ordering::Relaxed)
            );
        }
    }
    header(
        &mut out,
        "cardvault_http_request_duration_seconds",
        "histogram",
        "Time from the request's arrival to its response, by route pattern and method.",
    );
    for ((route, method), stats) in &routes {
        let labels = format!("route=\"{}\",method=\"{}\"", escape(route), escape(method));
        stats
            .latency
            .render(&mut out, "cardvault_http_request_duration_seconds", &labels);
    }

    header(
        &mut out,
        "cardvault_store_flush_duration_seconds",
        "histogram",
        "Group flushes of the store: sled's flush and the fdatasync after it.",
    );
    m.flush_seconds
        .render(&mut out, "cardvault_store_flush_duration_seconds", "");
    header(
        &mut out,
        "cardvault_store_flush_group_size",
        "histogram",
        "Writes made durable by one group flush.",
    );
    m.flush_group
        .render(&mut out, "cardvault_store_flush_group_size", "");

    header(
        &mut out,
        "cardvault_audit_write_duration_seconds",
        "histogram",
        "Writes of one batch of audit lines.",
    );
    m.audit_write_seconds
        .render(&mut out, "cardvault_audit_write_duration_seconds", "");
    single(
        &mut out,
        "cardvault_audit_backlog_lines",
        "gauge",
        "Audit lines waiting when the last batch was taken.",
        m.audit_backlog.load(Ordering::Relaxed),
    );
    single(
        &mut out,
        "cardvault_tls_handshake_failures_total",
        "counter",
        "TLS handshakes that failed (each is also a log line, rate-limited).",
        m.handshake_failures.load(Ordering::Relaxed),
    );
    single(
        &mut out,
        "cardvault_sealed",
        "gauge",
        "1 while the vault is sealed (no KEK in memory).",
        u8::from(snapshot.sealed),
    );
    single(
        &mut out,
        "cardvault_ready",
        "gauge",
        "1 while the store and the audit trail take writes.",
        u8::from(snapshot.ready),
    );
    single(
        &mut out,
        "cardvault_nodes",
        "gauge",
        "Nodes serving this store, this one included, as of the last heartbeat (1 on sled).",
        snapshot.nodes,
    );
    single(
        &mut out,
        "cardvault_leader",
        "gauge",
        "1 while this node runs the background work (key maintenance, sweeps).",
        u8::from(snapshot.leader),
    );

    for (name, help, value) in [
        (
            "cardvault_dek_encryptions",
            "Seals made under each project's DEK version (reserved ahead in blocks: may run ahead).",
            (|d| d.3) as fn(&Dek) -> u64,
        ),
        (
            "cardvault_dek_rotation_limit",
            "Seals after which a DEK version is rotated automatically.",
            |d| d.4,
        ),
    ] {
        header(&mut out, name, "gauge", help);
        for dek in &snapshot.deks {
            let (project, version, state, ..) = dek;
            let _ = writeln!(
                out,
                "{name}{{project=\"{}\",version=\"{version}\",state=\"{}\"}} {}",
                escape(project),
                escape(state),
                value(dek)
            );
        }
    }

    header(
        &mut out,
        "cardvault_tls_expiry_seconds",
        "gauge",
        "Seconds until each certificate expires or each CRL needs its next update (negative: past).",
    );
    for (kind, subject, at) in &snapshot.tls_deadlines {
        let _ = writeln!(
            out,
            "cardvault_tls_expiry_seconds{{kind=\"{kind}\",subject=\"{}\"}} {}",
            escape(subject),
            at.saturating_sub(snapshot.now)
        );
    }

    header(
        &mut out,
        "cardvault_records",
        "gauge",
        "Card tokens in the store as of the last sweep (used and expired ones included), and CVCs held now.",
    );
    for (kind, n) in &snapshot.records {
        let _ = writeln!(out, "cardvault_records{{kind=\"{kind}\"}} {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets are cumulative when rendered, `+Inf` equals the count, and the sum adds up.
    #[test]
    fn histograms_render_cumulative_buckets() {
        let h = Histogram::new(&SIZES);
        for v in [1.0, 3.0, 3.0, 2000.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"4\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"1024\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum{a=\"b\"} 2007\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 4\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
