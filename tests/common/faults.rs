//! An HTTP-aware proxy between a mount and the S3 server that injects faults request by
//! request: error answers (500 InternalError, 503 SlowDown), delays, connections reset in
//! the middle of a response body, bodies cut short of their Content-Length, requests
//! dropped unanswered, upload bodies with a byte flipped, and refused connections for a
//! while. It can also take the store off the network until told otherwise (new connections
//! refused, open ones cut), and slow the traffic towards the store to a given bandwidth.
//!
//! Requests and responses are relayed byte for byte (signatures stay valid); only their
//! framing (Content-Length, chunked) is read, to know where each one ends.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the proxy does to one request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status and S3 error code, without asking the server.
    Error(u16, &'static str),
    /// Wait this long, then relay.
    Delay(Duration),
    /// Relay the request; send the response head and half the body, then reset the
    /// connection (RST).
    ResetMidBody,
    /// Relay the request; send the head and half the body, then close cleanly (FIN), so
    /// the body ends short of its Content-Length.
    TruncateBody,
    /// Read the request and close the connection without an answer.
    Drop,
    /// Relay the request with one byte of its body flipped, as a damaged network path or
    /// a faulty middlebox would.
    FlipBodyByte,
}

/// What the policy sees of a request.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub method: String,
    /// Path and query, e.g. `/bucket/key?partNumber=2&uploadId=...`.
    pub target: String,
    /// Requests seen so far, this one included.
    pub n: u64,
    /// Whether it carries a CRC-32 of its body (`x-amz-checksum-crc32`).
    pub crc32_header: bool,
    /// Whether its signature covers its body: `x-amz-content-sha256` is the body's SHA-256,
    /// not `UNSIGNED-PAYLOAD`.
    pub signed_body: bool,
}

impl RequestInfo {
    /// A GET of object data (not a listing).
    pub fn is_object_get(&self) -> bool {
        self.method == "GET" && !self.target.contains("list-type") && !self.target.ends_with('/')
    }

    /// A request that carries data to the store (PUT of an object or a part).
    pub fn is_upload(&self) -> bool {
        self.method == "PUT" && !self.target.contains("x-id=CopyObject")
    }
}

pub type Policy = Arc<dyn Fn(&RequestInfo) -> Option<Fault> + Send + Sync>;

pub struct FaultProxy {
    pub port: u16,
    policy: Arc<Mutex<Policy>>,
    refuse_until: Arc<Mutex<Option<Instant>>>,
    links: Arc<Mutex<Links>>,
    /// Microseconds of delay per 64 KiB sent towards the server (0: full speed).
    delay_us: Arc<AtomicU64>,
    injected: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Relays 127.0.0.1:<port> to `target` (host:port), faults chosen by `policy`.
    pub fn start(target: &str, policy: Policy) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = FaultProxy {
            port: listener.local_addr().unwrap().port(),
            policy: Arc::new(Mutex::new(policy)),
            refuse_until: Arc::default(),
            links: Arc::default(),
            delay_us: Arc::default(),
            injected: Arc::default(),
            requests: Arc::default(),
            stop: Arc::default(),
        };
        let shared = Shared {
            target: target.to_string(),
            policy: p.policy.clone(),
            delay_us: p.delay_us.clone(),
            injected: p.injected.clone(),
            requests: p.requests.clone(),
        };
        let (refuse_until, links, stop, injected) = (
            p.refuse_until.clone(),
            p.links.clone(),
            p.stop.clone(),
            p.injected.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let refusing = refuse_until
                    .lock()
                    .unwrap()
                    .is_some_and(|t| Instant::now() < t);
                // Registered under the same lock `down` takes, so no connection slips past it.
                let id = {
                    let mut links = links.lock().unwrap();
                    match (refusing || links.down, client.try_clone()) {
                        (false, Ok(handle)) => {
                            links.next_id += 1;
                            let id = links.next_id;
                            links.open.insert(id, handle);
                            Some(id)
                        }
                        _ => None,
                    }
                };
                let Some(id) = id else {
                    injected.fetch_add(1, Ordering::Relaxed);
                    reset(&client);
                    continue;
                };
                let (shared, links) = (shared.clone(), links.clone());
                std::thread::spawn(move || {
                    let _ = serve(client, &shared);
                    links.lock().unwrap().open.remove(&id);
                });
            }
        });
        p
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_policy(&self, policy: Policy) {
        *self.policy.lock().unwrap() = policy;
    }

    /// Refuses new connections for `d` (open ones carry on).
    pub fn refuse_for(&self, d: Duration) {
        *self.refuse_until.lock().unwrap() = Some(Instant::now() + d);
    }

    /// Whether connections are being refused now.
    pub fn refusing(&self) -> bool {
        self.links.lock().unwrap().down
            || self
                .refuse_until
                .lock()
                .unwrap()
                .is_some_and(|t| Instant::now() < t)
    }

    /// Takes the store off the network until `up`: new connections are refused and the open
    /// ones cut (reset), whatever they are in the middle of.
    pub fn down(&self) {
        let mut links = self.links.lock().unwrap();
        links.down = true;
        for (_, c) in links.open.drain() {
            reset(&c);
        }
    }

    /// Puts the store back on the network after `down`.
    pub fn up(&self) {
        self.links.lock().unwrap().down = false;
    }

    /// Slows the traffic towards the server to about `bytes_per_sec`.
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.delay_us
            .store(65_536 * 1_000_000 / bytes_per_sec.max(1), Ordering::Relaxed);
    }

    /// Faults injected so far: requests answered wrongly and connections refused.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The client connections open now, and whether the store is taken off the network.
#[derive(Default)]
struct Links {
    down: bool,
    next_id: u64,
    open: HashMap<u64, TcpStream>,
}

#[derive(Clone)]
struct Shared {
    target: String,
    policy: Arc<Mutex<Policy>>,
    delay_us: Arc<AtomicU64>,
    injected: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

/// Writes `bytes` towards the server, 64 KiB at a time, paced by the throttle.
fn send_to_server(to: &mut TcpStream, bytes: &[u8], delay_us: &AtomicU64) -> std::io::Result<()> {
    for chunk in bytes.chunks(65_536) {
        let d = delay_us.load(Ordering::Relaxed);
        if d > 0 {
            std::thread::sleep(Duration::from_micros(d * chunk.len() as u64 / 65_536));
        }
        to.write_all(chunk)?;
    }
    Ok(())
}

/// Closes with a TCP reset rather than a clean FIN.
fn reset(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the right size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = s.shutdown(Shutdown::Both);
}

/// One HTTP message: its head (start line and headers, as received) and its body bytes as
/// framed on the wire.
struct Message {
    head: Vec<u8>,
    body: Vec<u8>,
}

impl Message {
    fn start_line(&self) -> String {
        let end = self
            .head
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap_or(self.head.len());
        String::from_utf8_lossy(&self.head[..end]).into_owned()
    }

    fn header(&self, name: &str) -> Option<String> {
        String::from_utf8_lossy(&self.head)
            .split("\r\n")
            .skip(1)
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
    }
}

/// Reads a head; None at a clean end of stream.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head)?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        if head.ends_with(b"\r\n\r\n") {
            return Ok(Some(head));
        }
    }
}

/// Reads a body framed by the message's headers (no body when `bodiless`).
fn read_body(r: &mut impl BufRead, m: &Message, bodiless: bool) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if bodiless {
        return Ok(body);
    }
    let chunked = m
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line)?;
            body.extend_from_slice(&line);
            let size_hex = String::from_utf8_lossy(&line);
            let size = usize::from_str_radix(size_hex.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailers, then the blank line.
                loop {
                    let mut t = Vec::new();
                    r.read_until(b'\n', &mut t)?;
                    body.extend_from_slice(&t);
                    if t == b"\r\n" || t.is_empty() {
                        return Ok(body);
                    }
                }
            }
            let start = body.len();
            body.resize(start + size + 2, 0);
            r.read_exact(&mut body[start..])?;
        }
    }
    let len: usize = m
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    body.resize(len, 0);
    r.read_exact(&mut body)?;
    Ok(body)
}

fn error_response(status: u16, code: &str) -> Vec<u8> {
    let reason = match status {
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>"
    );
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn serve(client: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client;
    let mut server: Option<(BufReader<TcpStream>, TcpStream)> = None;
    loop {
        let Some(head) = read_head(&mut from_client)? else {
            return Ok(());
        };
        let mut req = Message {
            head,
            body: Vec::new(),
        };
        req.body = read_body(&mut from_client, &req, false)?;
        let start = req.start_line();
        let mut parts = start.split(' ');
        let info = RequestInfo {
            method: parts.next().unwrap_or("").to_string(),
            target: parts.next().unwrap_or("").to_string(),
            n: shared.requests.fetch_add(1, Ordering::Relaxed) + 1,
            crc32_header: req.header("x-amz-checksum-crc32").is_some(),
            signed_body: req
                .header("x-amz-content-sha256")
                .is_some_and(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())),
        };
        let policy = shared.policy.lock().unwrap().clone();
        let fault = policy(&info);
        if fault.is_some() {
            shared.injected.fetch_add(1, Ordering::Relaxed);
        }
        match &fault {
            Some(Fault::Error(status, code)) => {
                to_client.write_all(&error_response(*status, code))?;
                continue;
            }
            Some(Fault::Drop) => {
                reset(&to_client);
                return Ok(());
            }
            Some(Fault::Delay(d)) => std::thread::sleep(*d),
            _ => {}
        }
        if server.is_none() {
            let s = TcpStream::connect(&shared.target)?;
            server = Some((BufReader::new(s.try_clone()?), s));
        }
        let (from_server, to_server) = server.as_mut().unwrap();
        send_to_server(to_server, &req.head, &shared.delay_us)?;
        if matches!(fault, Some(Fault::FlipBodyByte)) && !req.body.is_empty() {
            let mut body = req.body.clone();
            let i = body.len() / 2;
            body[i] ^= 0x20;
            send_to_server(to_server, &body, &shared.delay_us)?;
        } else {
            send_to_server(to_server, &req.body, &shared.delay_us)?;
        }
        let resp = loop {
            let head = read_head(from_server)?.ok_or(std::io::ErrorKind::UnexpectedEof)?;
            let m = Message {
                head,
                body: Vec::new(),
            };
            let status: u16 = m
                .start_line()
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if (100..200).contains(&status) {
                to_client.write_all(&m.head)?;
                continue;
            }
            let bodiless = info.method == "HEAD" || status == 204 || status == 304;
            let mut m = m;
            m.body = read_body(from_server, &m, bodiless)?;
            break m;
        };
        match fault {
            Some(Fault::ResetMidBody) | Some(Fault::TruncateBody) if resp.body.len() > 1 => {
                to_client.write_all(&resp.head)?;
                to_client.write_all(&resp.body[..resp.body.len() / 2])?;
                to_client.flush()?;
                if matches!(fault, Some(Fault::ResetMidBody)) {
                    reset(&to_client);
                } else {
                    let _ = to_client.shutdown(Shutdown::Both);
                }
                if let Some((_, s)) = server.take() {
                    let _ = s.shutdown(Shutdown::Both);
                }
                return Ok(());
            }
            _ => {
                to_client.write_all(&resp.head)?;
                to_client.write_all(&resp.body)?;
                if resp
                    .header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                {
                    server = None;
                }
            }
        }
    }
}

/// Policies used by the fault tests.
pub mod policy {
    use super::*;

    /// Every `every`-th request gets `fault`.
    pub fn every(every: u64, fault: Fault) -> Policy {
        Arc::new(move |r: &RequestInfo| (r.n % every == 0).then(|| fault.clone()))
    }

    /// Every `every`-th object GET gets `fault`.
    pub fn every_get(every: u64, fault: Fault) -> Policy {
        let seen = Arc::new(AtomicU64::new(0));
        Arc::new(move |r: &RequestInfo| {
            if !r.is_object_get() {
                return None;
            }
            let n = seen.fetch_add(1, Ordering::Relaxed) + 1;
            (n % every == 0).then(|| fault.clone())
        })
    }

    /// Every `every`-th upload (PUT of an object or a part) gets `fault`.
    pub fn every_upload(every: u64, fault: Fault) -> Policy {
        let seen = Arc::new(AtomicU64::new(0));
        Arc::new(move |r: &RequestInfo| {
            if !r.is_upload() {
                return None;
            }
            let n = seen.fetch_add(1, Ordering::Relaxed) + 1;
            (n % every == 0).then(|| fault.clone())
        })
    }

    pub fn none() -> Policy {
        Arc::new(|_: &RequestInfo| None)
    }
}
