//! Prometheus metrics (`serve --metrics ADDR`): what a CI operator watches — hit rates, sizes,
//! commits and discards, latencies, evictions, compactions, GC, orphaned sessions.
//!
//! One process-wide registry ([`global`]); the driver, maintenance and session code record into
//! it through the small functions below, which cost an atomic add when nobody scrapes. The text
//! exposition is `prometheus-client`'s, served by a tiny hyper server on its own task.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

type Labels = Vec<(&'static str, String)>;

/// Every metric we export.
pub struct Metrics {
    registry: Registry,
    sessions_started: Family<Labels, Counter>,
    sessions_ended: Family<Labels, Counter>,
    mount_seconds: Histogram,
    unmount_seconds: Histogram,
    layers: Family<Labels, Gauge>,
    bytes: Family<Labels, Gauge>,
    evictions: Family<Labels, Counter>,
    compactions: Family<Labels, Counter>,
    gc_freed_bytes: Counter,
    gc_layers_deleted: Counter,
    orphans_ended: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Registers a clone of `metric` under `name` with `help` and hands the metric back, so each
/// field of [`Metrics`] is made and registered in one place.
fn reg<M: Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: M) -> M {
    r.register(name, help, metric.clone());
    metric
}

/// A latency histogram with buckets from 1 ms to ~16 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

fn new() -> Metrics {
    let mut registry = Registry::with_prefix("cachedriver");
    let r = &mut registry;
    // Registration order is exposition order.
    Metrics {
        sessions_started: reg(
            r,
            "sessions_started",
            "Sessions started, by cache and whether the snapshot they started on had content (hit) or was empty (miss)",
            Family::default(),
        ),
        sessions_ended: reg(
            r,
            "sessions_ended",
            "Sessions ended, by cache and outcome (committed, discarded, empty)",
            Family::default(),
        ),
        mount_seconds: reg(
            r,
            "mount_seconds",
            "Latency of Mount calls that started a session",
            latency(),
        ),
        unmount_seconds: reg(
            r,
            "unmount_seconds",
            "Latency of the last Unmount of a session (unmount plus commit)",
            latency(),
        ),
        layers: reg(r, "layers", "Layers on disk, by cache", Family::default()),
        bytes: reg(
            r,
            "bytes",
            "Disk taken by a cache's layers (each inode counted once), by cache",
            Family::default(),
        ),
        evictions: reg(
            r,
            "evictions",
            "Caches evicted by the disk budget, by reason (max-size, max-idle)",
            Family::default(),
        ),
        compactions: reg(
            r,
            "compactions",
            "Compactions of a cache's chain, by cache",
            Family::default(),
        ),
        gc_freed_bytes: reg(
            r,
            "gc_freed_bytes",
            "Bytes freed by garbage collection",
            Counter::default(),
        ),
        gc_layers_deleted: reg(
            r,
            "gc_layers_deleted",
            "Layers deleted by garbage collection",
            Counter::default(),
        ),
        orphans_ended: reg(
            r,
            "orphaned_sessions_ended",
            "Sessions ended because no container used them any more (engine crash, lost Unmount)",
            Counter::default(),
        ),
        registry,
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(new)
}

fn cache(c: &str) -> Labels {
    vec![("cache", c.to_string())]
}

/// A session started; `hit` when its snapshot had content.
pub fn session_started(c: &str, hit: bool, took: Duration) {
    let m = global();
    let mut l = cache(c);
    l.push(("result", if hit { "hit" } else { "miss" }.into()));
    m.sessions_started.get_or_create(&l).inc();
    m.mount_seconds.observe(took.as_secs_f64());
}

/// A session ended with `outcome` (`committed`, `discarded`, `empty`).
pub fn session_ended(c: &str, outcome: &str, took: Duration) {
    let m = global();
    let mut l = cache(c);
    l.push(("outcome", outcome.to_string()));
    m.sessions_ended.get_or_create(&l).inc();
    m.unmount_seconds.observe(took.as_secs_f64());
}

/// A cache's current size.
pub fn cache_size(c: &str, layers: u64, bytes: u64) {
    let m = global();
    m.layers.get_or_create(&cache(c)).set(layers as i64);
    m.bytes.get_or_create(&cache(c)).set(bytes as i64);
}

/// A cache was evicted (`reason`: `max-size` or `max-idle`); its size gauges drop to zero.
pub fn evicted(c: &str, reason: &str) {
    let m = global();
    let mut l = cache(c);
    l.push(("reason", reason.to_string()));
    m.evictions.get_or_create(&l).inc();
    cache_size(c, 0, 0);
}

/// A cache's chain was compacted.
pub fn compacted(c: &str) {
    global().compactions.get_or_create(&cache(c)).inc();
}

/// GC deleted `layers` layers freeing `bytes`.
pub fn gc_freed(layers: u64, bytes: u64) {
    let m = global();
    m.gc_layers_deleted.inc_by(layers);
    m.gc_freed_bytes.inc_by(bytes);
}

/// An orphaned session was ended.
pub fn orphan_ended() {
    global().orphans_ended.inc();
}

/// The text exposition of every metric.
pub fn render() -> String {
    let mut out = String::new();
    if encode(&mut out, &global().registry).is_err() {
        out.clear();
    }
    out
}

/// Serves `GET /metrics` (any path, in fact) on `addr` until the runtime stops.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding --metrics {addr}: {e}"))?;
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let mut resp = if req.uri().path() == "/metrics" {
                            hyper::Response::new(Full::new(Bytes::from(render())))
                        } else {
                            let mut r = hyper::Response::new(Full::new(Bytes::from_static(
                                b"metrics are at /metrics\n",
                            )));
                            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                            r
                        };
                        if let Ok(v) =
                            "application/openmetrics-text; version=1.0.0; charset=utf-8".parse()
                        {
                            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_renders() {
        session_started("m2", true, Duration::from_millis(3));
        session_ended("m2", "committed", Duration::from_millis(4));
        cache_size("m2", 3, 4096);
        evicted("old", "max-idle");
        compacted("m2");
        gc_freed(2, 8192);
        orphan_ended();
        let t = render();
        for want in [
            "cachedriver_sessions_started_total{cache=\"m2\",result=\"hit\"} 1",
            "cachedriver_sessions_ended_total{cache=\"m2\",outcome=\"committed\"} 1",
            "cachedriver_bytes{cache=\"m2\"} 4096",
            "cachedriver_evictions_total{cache=\"old\",reason=\"max-idle\"} 1",
            "cachedriver_gc_freed_bytes_total 8192",
            "cachedriver_mount_seconds_bucket",
        ] {
            assert!(t.contains(want), "missing {want} in:\n{t}");
        }
    }

    #[test]
    fn every_metric_is_exported_in_order_with_its_help_and_type() {
        // A fresh registry, one sample in each family so that every metric is written.
        let m = new();
        let l = cache("c");
        m.sessions_started.get_or_create(&l).inc();
        m.sessions_ended.get_or_create(&l).inc();
        m.layers.get_or_create(&l).set(2);
        m.bytes.get_or_create(&l).set(3);
        m.evictions.get_or_create(&l).inc();
        m.compactions.get_or_create(&l).inc();
        let mut t = String::new();
        encode(&mut t, &m.registry).unwrap();
        let got: Vec<&str> = t.lines().filter(|l| l.starts_with("# ")).collect();
        let want = [
            "# HELP cachedriver_sessions_started Sessions started, by cache and whether the snapshot they started on had content (hit) or was empty (miss).",
            "# TYPE cachedriver_sessions_started counter",
            "# HELP cachedriver_sessions_ended Sessions ended, by cache and outcome (committed, discarded, empty).",
            "# TYPE cachedriver_sessions_ended counter",
            "# HELP cachedriver_mount_seconds Latency of Mount calls that started a session.",
            "# TYPE cachedriver_mount_seconds histogram",
            "# HELP cachedriver_unmount_seconds Latency of the last Unmount of a session (unmount plus commit).",
            "# TYPE cachedriver_unmount_seconds histogram",
            "# HELP cachedriver_layers Layers on disk, by cache.",
            "# TYPE cachedriver_layers gauge",
            "# HELP cachedriver_bytes Disk taken by a cache's layers (each inode counted once), by cache.",
            "# TYPE cachedriver_bytes gauge",
            "# HELP cachedriver_evictions Caches evicted by the disk budget, by reason (max-size, max-idle).",
            "# TYPE cachedriver_evictions counter",
            "# HELP cachedriver_compactions Compactions of a cache's chain, by cache.",
            "# TYPE cachedriver_compactions counter",
            "# HELP cachedriver_gc_freed_bytes Bytes freed by garbage collection.",
            "# TYPE cachedriver_gc_freed_bytes counter",
            "# HELP cachedriver_gc_layers_deleted Layers deleted by garbage collection.",
            "# TYPE cachedriver_gc_layers_deleted counter",
            "# HELP cachedriver_orphaned_sessions_ended Sessions ended because no container used them any more (engine crash, lost Unmount).",
            "# TYPE cachedriver_orphaned_sessions_ended counter",
            "# EOF",
        ];
        assert_eq!(got, want);
    }
}
