//! Prometheus metrics: requests to the store by operation and outcome, retries, bytes moved,
//! how long FUSE operations take, and the state of the cache, the write-back queue and the
//! read buffers. Served as OpenMetrics text on `--metrics-addr`, and read by
//! `s3mediafs status` through the mount itself (see `fuse.rs`).

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type Labels = Vec<(&'static str, &'static str)>;

/// Connections the metrics endpoint serves at once; more wait to be accepted.
const METRICS_CONNECTIONS: usize = 16;
/// How long a connection to the metrics endpoint may take to send its request.
const METRICS_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
type LatencyFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 us to 6.5 s, by factors of 4.
    Histogram::new(exponential_buckets(0.0001, 4.0, 9))
}

/// FUSE requests by kind: counted on arrival, before any reply (so a request the kernel
/// sent during a system call is counted when the call returns), and how long each took
/// from arrival to reply.
#[derive(Clone)]
pub struct FuseMetrics {
    arrived: Family<Labels, Counter>,
    latency: LatencyFamily,
}

impl FuseMetrics {
    pub fn arrived(&self, op: &'static str) {
        self.arrived.get_or_create(&vec![("op", op)]).inc();
    }

    pub fn observe(&self, op: &'static str, took: std::time::Duration) {
        self.latency
            .get_or_create(&vec![("op", op)])
            .observe(took.as_secs_f64());
    }
}

/// What `s3mediafs status` shows in its first lines.
#[derive(Debug, Clone)]
pub struct MountInfo {
    pub source: String,
    pub endpoint: String,
    pub mountpoint: String,
    pub cache_dir: String,
    pub cache_limit: u64,
    pub write_mode: &'static str,
    /// Storage class and encryption of the objects written, as words (never a key).
    pub objects: String,
}

/// What the store layer counts.
#[derive(Clone, Default)]
pub struct StoreMetrics {
    requests: Family<Labels, Counter>,
    bytes_down: Counter,
    bytes_up: Counter,
}

impl StoreMetrics {
    pub fn request(&self, op: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&vec![("op", op), ("outcome", outcome)])
            .inc();
    }

    pub fn downloaded(&self, n: u64) {
        self.bytes_down.inc_by(n);
    }

    pub fn uploaded(&self, n: u64) {
        self.bytes_up.inc_by(n);
    }
}

/// A reading of the mount's state, taken at each scrape.
#[derive(Debug, Default, Clone, Copy)]
pub struct StateReading {
    pub cache_bytes: u64,
    pub staged_bytes: u64,
    pub dirty_bytes: u64,
    pub pending_changes: u64,
    pub unrecorded_changes: u64,
    pub read_memory_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_stored: u64,
    pub cache_evictions: u64,
    pub cache_skipped: u64,
    pub cache_corrupt: u64,
    pub passthrough_opens: u64,
    pub passthrough_checks: u64,
    pub passthrough_open_files: u64,
    pub inodes: u64,
    pub listed_names: u64,
    pub retries: u64,
}

pub type StateSource = Box<dyn Fn() -> StateReading + Send + Sync>;

struct StateMetrics {
    cache_bytes: Gauge,
    staged_bytes: Gauge,
    dirty_bytes: Gauge,
    pending_changes: Gauge,
    unrecorded_changes: Gauge,
    read_memory_bytes: Gauge,
    inodes: Gauge,
    listed_names: Gauge,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_stored: Counter,
    cache_evictions: Counter,
    cache_skipped: Counter,
    cache_corrupt: Counter,
    passthrough_opens: Counter,
    passthrough_checks: Counter,
    passthrough_open_files: Gauge,
    retries: Counter,
}

pub struct Metrics {
    registry: Registry,
    store: StoreMetrics,
    state: StateMetrics,
    fuse: FuseMetrics,
    source: parking_lot::Mutex<Option<StateSource>>,
}

fn catch_up(c: &Counter, value: u64) {
    c.inc_by(value.saturating_sub(c.get()));
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::build())
    }

    /// Metrics for a mount, with what is mounted where.
    pub fn for_mount(info: &MountInfo) -> Arc<Self> {
        let mut m = Self::build();
        m.describe_mount(info);
        Arc::new(m)
    }

    fn build() -> Self {
        let mut registry = Registry::with_prefix("s3mediafs");
        let store = StoreMetrics::default();
        registry.register(
            "requests",
            "Requests to the object store, by operation and outcome",
            store.requests.clone(),
        );
        registry.register(
            "downloaded_bytes",
            "Bytes read from the object store",
            store.bytes_down.clone(),
        );
        registry.register(
            "uploaded_bytes",
            "Bytes written to the object store",
            store.bytes_up.clone(),
        );
        let state = StateMetrics {
            cache_bytes: Gauge::default(),
            staged_bytes: Gauge::default(),
            dirty_bytes: Gauge::default(),
            pending_changes: Gauge::default(),
            unrecorded_changes: Gauge::default(),
            read_memory_bytes: Gauge::default(),
            inodes: Gauge::default(),
            listed_names: Gauge::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_stored: Counter::default(),
            cache_evictions: Counter::default(),
            cache_skipped: Counter::default(),
            cache_corrupt: Counter::default(),
            passthrough_opens: Counter::default(),
            passthrough_checks: Counter::default(),
            passthrough_open_files: Gauge::default(),
            retries: Counter::default(),
        };
        registry.register(
            "cache_block_bytes",
            "Disk space held by cached blocks",
            state.cache_bytes.clone(),
        );
        registry.register(
            "cache_staged_bytes",
            "Disk space held by files being written or waiting for upload",
            state.staged_bytes.clone(),
        );
        registry.register(
            "dirty_bytes",
            "Bytes of closed files waiting for upload",
            state.dirty_bytes.clone(),
        );
        registry.register(
            "pending_changes",
            "Changes (uploads, deletes, directories) not yet in the bucket",
            state.pending_changes.clone(),
        );
        registry.register(
            "unrecorded_changes",
            "Changes in the bucket that the journal could not record as done: their local copies are kept, and a restart now would upload them again",
            state.unrecorded_changes.clone(),
        );
        registry.register(
            "read_memory_bytes",
            "Memory held by reads in flight and read buffers",
            state.read_memory_bytes.clone(),
        );
        registry.register(
            "inodes",
            "Files and directories the mount holds in memory",
            state.inodes.clone(),
        );
        registry.register(
            "listed_names",
            "Names remembered from directory listings for the metadata TTL",
            state.listed_names.clone(),
        );
        registry.register(
            "cache_hits",
            "Blocks read from the block cache",
            state.cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Blocks not found in the block cache",
            state.cache_misses.clone(),
        );
        registry.register(
            "cache_stored",
            "Blocks fetched from the bucket and written into the block cache",
            state.cache_stored.clone(),
        );
        registry.register(
            "cache_evictions",
            "Blocks evicted to make room",
            state.cache_evictions.clone(),
        );
        registry.register(
            "cache_skipped",
            "Blocks not cached for lack of room",
            state.cache_skipped.clone(),
        );
        registry.register(
            "cache_corrupt",
            "Cached blocks found damaged and dropped",
            state.cache_corrupt.clone(),
        );
        registry.register(
            "passthrough_opens",
            "Opens the kernel reads straight from a local file: the sealed copy of a file written here, or a fully cached object",
            state.passthrough_opens.clone(),
        );
        registry.register(
            "passthrough_checks",
            "Cache files checked block by block before being passed through, because they \
             changed since the mount last wrote or checked them",
            state.passthrough_checks.clone(),
        );
        registry.register(
            "passthrough_open_files",
            "Open files the kernel reads straight from a local file",
            state.passthrough_open_files.clone(),
        );
        registry.register(
            "retries",
            "Requests to the object store sent again after a failed attempt",
            state.retries.clone(),
        );
        let fuse = FuseMetrics {
            arrived: Family::default(),
            latency: LatencyFamily::new_with_constructor(latency_histogram),
        };
        registry.register(
            "fuse_requests",
            "FUSE requests received, by operation, counted on arrival",
            fuse.arrived.clone(),
        );
        registry.register(
            "fuse_op_seconds",
            "Time from a FUSE request's arrival to its reply, by operation",
            fuse.latency.clone(),
        );
        Metrics {
            registry,
            store,
            state,
            fuse,
            source: parking_lot::Mutex::new(None),
        }
    }

    pub fn store(&self) -> StoreMetrics {
        self.store.clone()
    }

    pub fn fuse(&self) -> FuseMetrics {
        self.fuse.clone()
    }

    /// Records what is mounted where, as an info metric and the cache's limit.
    fn describe_mount(&mut self, info: &MountInfo) {
        let labels: Vec<(&'static str, String)> = vec![
            ("source", info.source.clone()),
            ("endpoint", info.endpoint.clone()),
            ("mountpoint", info.mountpoint.clone()),
            ("cache_dir", info.cache_dir.clone()),
            ("write_mode", info.write_mode.to_string()),
            ("objects", info.objects.clone()),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
        ];
        let family = Family::<Vec<(&'static str, String)>, Gauge>::default();
        family.get_or_create(&labels).set(1);
        self.registry
            .register("mount", "What is mounted where (always 1)", family);
        let limit = Gauge::<i64>::default();
        limit.set(info.cache_limit as i64);
        self.registry.register(
            "cache_limit_bytes",
            "Most disk the cache directory may use (--cache-size)",
            limit,
        );
        let started = Gauge::<i64>::default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        started.set(now);
        self.registry.register(
            "start_time_seconds",
            "When the mount started, in seconds since the Unix epoch",
            started,
        );
    }

    /// Where the state gauges are read from at each scrape.
    pub fn set_source(&self, source: StateSource) {
        *self.source.lock() = Some(source);
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        if let Some(source) = self.source.lock().as_ref() {
            let r = source();
            let s = &self.state;
            s.cache_bytes.set(r.cache_bytes as i64);
            s.staged_bytes.set(r.staged_bytes as i64);
            s.dirty_bytes.set(r.dirty_bytes as i64);
            s.pending_changes.set(r.pending_changes as i64);
            s.unrecorded_changes.set(r.unrecorded_changes as i64);
            s.read_memory_bytes.set(r.read_memory_bytes as i64);
            s.inodes.set(r.inodes as i64);
            s.listed_names.set(r.listed_names as i64);
            catch_up(&s.cache_hits, r.cache_hits);
            catch_up(&s.cache_misses, r.cache_misses);
            catch_up(&s.cache_evictions, r.cache_evictions);
            catch_up(&s.cache_skipped, r.cache_skipped);
            catch_up(&s.cache_stored, r.cache_stored);
            catch_up(&s.cache_corrupt, r.cache_corrupt);
            catch_up(&s.passthrough_opens, r.passthrough_opens);
            catch_up(&s.passthrough_checks, r.passthrough_checks);
            s.passthrough_open_files
                .set(r.passthrough_open_files as i64);
            catch_up(&s.retries, r.retries);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Serves `GET /metrics` on `listener` until the runtime stops: at most
    /// `METRICS_CONNECTIONS` at once, each given `METRICS_READ_TIMEOUT` to send its request;
    /// a failing accept (no descriptor left, say) is retried after a pause, not in a spin.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let mut conn = match listener.accept().await {
                Ok((conn, _)) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "the metrics endpoint cannot accept a connection; trying again in a second");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let mut buf = Vec::with_capacity(1024);
                let mut chunk = [0u8; 1024];
                let deadline = tokio::time::Instant::now() + METRICS_READ_TIMEOUT;
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 << 10 {
                    match tokio::time::timeout_at(deadline, conn.read(&mut chunk)).await {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                        Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
                let (status, body) =
                    if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET / ") {
                        ("200 OK", me.render())
                    } else {
                        (
                            "404 Not Found",
                            "only /metrics is served here\n".to_string(),
                        )
                    };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let answer = async {
                    conn.write_all(head.as_bytes()).await?;
                    conn.write_all(body.as_bytes()).await?;
                    conn.shutdown().await
                };
                let _ = tokio::time::timeout(METRICS_READ_TIMEOUT, answer).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_cannot_starve_the_metrics_endpoint() {
        let metrics = Metrics::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(metrics.serve(listener));
        let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let before = fds();
        // More connections than it serves at once, none sending a request: it holds a
        // descriptor for at most METRICS_CONNECTIONS of them.
        let mut idle = Vec::new();
        for _ in 0..2 * METRICS_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let held = fds() - before - idle.len();
        assert!(
            held <= METRICS_CONNECTIONS + 4,
            "{held} descriptors for idle connections"
        );
        let ask = async {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
            let mut text = String::new();
            c.read_to_string(&mut text).await.unwrap();
            text
        };
        let text = tokio::time::timeout(METRICS_READ_TIMEOUT * 4, ask)
            .await
            .expect("the idle connections were never dropped");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }

    #[test]
    fn renders_requests_and_state() {
        let m = Metrics::new();
        m.store().request("get", "ok");
        m.store().request("get", "ok");
        m.store().request("head", "not_found");
        m.store().downloaded(10);
        m.set_source(Box::new(|| StateReading {
            cache_bytes: 4096,
            cache_hits: 3,
            ..Default::default()
        }));
        let text = m.render();
        assert!(
            text.contains("s3mediafs_requests_total{op=\"get\",outcome=\"ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("s3mediafs_requests_total{op=\"head\",outcome=\"not_found\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("s3mediafs_downloaded_bytes_total 10"),
            "{text}"
        );
        assert!(text.contains("s3mediafs_cache_block_bytes 4096"), "{text}");
        assert!(text.contains("s3mediafs_cache_hits_total 3"), "{text}");
        // Rendering again does not count twice.
        assert!(m.render().contains("s3mediafs_cache_hits_total 3"));
    }
}
