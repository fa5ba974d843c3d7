//! Metric names and handles, in one place.
//!
//! Each [`crate::Server`] owns its own Prometheus recorder (no process-global recorder), so
//! two instances in one test process report separately. Handles are registered once and
//! updated without a lookup on the hot path.

use dashmap::DashMap;
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

const HTTP_REQUESTS: &str = "msgbuf_http_requests_total";
const META: Metadata<'static> = Metadata::new("msgbuf", Level::INFO, Some("msgbuf"));

/// Which path put a message on a socket (the `path` label of deliveries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryPath {
    /// A change event pushed to a joined socket.
    Live,
    /// A join's drain of what was pending.
    Drain,
    /// A re-send after the ack timeout (by a join's drain or the sweep).
    Redelivery,
    /// The sweep's safety net: an undelivered message no push or drain took.
    Sweep,
    /// The rescan after the change stream lost its place.
    Rescan,
}

impl DeliveryPath {
    pub const ALL: [DeliveryPath; 5] = [
        DeliveryPath::Live,
        DeliveryPath::Drain,
        DeliveryPath::Redelivery,
        DeliveryPath::Sweep,
        DeliveryPath::Rescan,
    ];

    fn label(self) -> &'static str {
        match self {
            DeliveryPath::Live => "live",
            DeliveryPath::Drain => "drain",
            DeliveryPath::Redelivery => "redelivery",
            DeliveryPath::Sweep => "sweep",
            DeliveryPath::Rescan => "rescan",
        }
    }
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    pub accepted_ws: Counter,
    pub accepted_rest: Counter,
    /// Indexed by `DeliveryPath as usize`.
    delivered: [Counter; 5],
    /// `msgbuf_http_requests_total` by (route template, status), registered on first use.
    http_requests: DashMap<(String, u16), Counter>,
    pub claims_lost: Counter,
    pub acks: Counter,
    pub claims_with_ack: Counter,
    pub receipts: Counter,
    pub delivery_latency: Histogram,
    pub accept_latency: Histogram,
    /// Sends accepted later than the device skew window after their id was made.
    pub late_accepts: Counter,
    pub insert_latency: Histogram,
    pub stream_lag: Histogram,
    pub stream_events: Counter,
    pub stream_resumes: Counter,
    pub stream_history_lost: Counter,
    pub checkpoints: Counter,
    connections: Gauge,
    online_users: Gauge,
    pub queue_full_disconnects: Counter,
    pub rate_limited: Counter,
    pub protocol_errors: Counter,
    pub cleanup_sweeps: Counter,
    pub cleanup_deleted_delivered: Counter,
    pub cleanup_deleted_undelivered: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        const LATENCY_BUCKETS: &[f64] = &[
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let r = &recorder;
        r.describe_counter(
            HTTP_REQUESTS.into(),
            None,
            "HTTP requests by route and status".into(),
        );
        let counter =
            |name: &'static str, help: &'static str, labels: &[(&'static str, &'static str)]| {
                r.describe_counter(name.into(), None, help.into());
                let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, *v)).collect();
                r.register_counter(&Key::from_parts(name, labels), &META)
            };
        let gauge = |name: &'static str, help: &'static str| {
            r.describe_gauge(name.into(), None, help.into());
            r.register_gauge(&Key::from_name(name), &META)
        };
        let histogram = |name: &'static str, help: &'static str| {
            r.describe_histogram(name.into(), Some(Unit::Seconds), help.into());
            r.register_histogram(&Key::from_name(name), &META)
        };
        const ACCEPTED: &str = "msgbuf_messages_accepted_total";
        const DELIVERED: &str = "msgbuf_messages_delivered_total";
        const ACCEPTED_HELP: &str = "Messages durably stored and acknowledged to the sender";
        const DELIVERED_HELP: &str = "Messages written to a receiver socket and recorded, by path";
        const DELETED: &str = "msgbuf_cleanup_deleted_total";
        const DELETED_HELP: &str = "Messages removed by the cleanup sweep";
        Metrics {
            accepted_ws: counter(ACCEPTED, ACCEPTED_HELP, &[("via", "ws")]),
            accepted_rest: counter(ACCEPTED, ACCEPTED_HELP, &[("via", "rest")]),
            delivered: DeliveryPath::ALL
                .map(|path| counter(DELIVERED, DELIVERED_HELP, &[("path", path.label())])),
            http_requests: DashMap::new(),
            claims_lost: counter(
                "msgbuf_claims_lost_total",
                "Delivery claims already taken by another instance",
                &[],
            ),
            acks: counter(
                "msgbuf_acks_total",
                "Messages acknowledged by receivers",
                &[],
            ),
            claims_with_ack: counter(
                "msgbuf_claims_with_ack_total",
                "Deliveries whose claim and ack went in one write (the ack arrived first)",
                &[],
            ),
            receipts: counter(
                "msgbuf_receipts_sent_total",
                "Receipt frames queued to sender sockets",
                &[],
            ),
            delivery_latency: histogram(
                "msgbuf_delivery_latency_seconds",
                "Insert (acceptance) to push on a receiver socket, live path",
            ),
            accept_latency: histogram(
                "msgbuf_accept_latency_seconds",
                "A send read from its socket to stored with majority write concern (queue + insert)",
            ),
            late_accepts: counter(
                "msgbuf_late_accepts_total",
                "Sends accepted later than MSGBUF_DEVICE_SKEW after they arrived (a device that caught up past them meanwhile would not get them)",
                &[],
            ),
            insert_latency: histogram(
                "msgbuf_insert_batch_seconds",
                "One insertMany of a batch of sends, majority write concern",
            ),
            stream_lag: histogram(
                "msgbuf_stream_lag_seconds",
                "Now minus the change event's wall time",
            ),
            stream_events: counter("msgbuf_stream_events_total", "Change events handled", &[]),
            stream_resumes: counter(
                "msgbuf_stream_resumes_total",
                "Change stream (re)opened after an error",
                &[],
            ),
            stream_history_lost: counter(
                "msgbuf_stream_history_lost_total",
                "Resume token no longer in the oplog; collection rescanned",
                &[],
            ),
            checkpoints: counter(
                "msgbuf_stream_checkpoints_total",
                "Resume token checkpoints written",
                &[],
            ),
            connections: gauge(
                "msgbuf_connections",
                "Open WebSocket connections on this instance",
            ),
            online_users: gauge(
                "msgbuf_online_users",
                "Users with a joined session on this instance",
            ),
            queue_full_disconnects: counter(
                "msgbuf_queue_full_disconnects_total",
                "Sockets closed because their outbound queue was full",
                &[],
            ),
            rate_limited: counter(
                "msgbuf_rate_limited_total",
                "chat_message frames refused by the per-connection rate limit",
                &[],
            ),
            protocol_errors: counter(
                "msgbuf_protocol_errors_total",
                "error events sent for bad client frames",
                &[],
            ),
            cleanup_sweeps: counter(
                "msgbuf_cleanup_sweeps_total",
                "Cleanup sweeps run by this instance (lease held)",
                &[],
            ),
            cleanup_deleted_delivered: counter(DELETED, DELETED_HELP, &[("kind", "delivered")]),
            cleanup_deleted_undelivered: counter(DELETED, DELETED_HELP, &[("kind", "undelivered")]),
            recorder,
        }
    }

    pub fn delivered(&self, path: DeliveryPath, n: u64) {
        self.delivered[path as usize].increment(n);
    }

    /// Counts one HTTP request by route template and status.
    pub fn http_request(&self, route: &str, status: u16) {
        if let Some(counter) = self.http_requests.get(&(route.to_owned(), status)) {
            counter.increment(1);
            return;
        }
        let labels = vec![
            Label::new("route", route.to_owned()),
            Label::new("status", status.to_string()),
        ];
        let counter = self
            .recorder
            .register_counter(&Key::from_parts(HTTP_REQUESTS, labels), &META);
        counter.increment(1);
        self.http_requests
            .insert((route.to_owned(), status), counter);
    }

    /// Prometheus text, with the gauges read at scrape time.
    pub fn render(&self, connections: usize, online_users: usize) -> String {
        self.connections.set(connections as f64);
        self.online_users.set(online_users as f64);
        self.recorder.handle().render()
    }
}
