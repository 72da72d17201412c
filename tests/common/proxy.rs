//! A TCP proxy between a mount and the S3 server, for tests: it can be taken down
//! (connections refused, open ones cut) and brought back, and it can slow uploads.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    /// Microseconds of delay per 64 KiB sent towards the server.
    delay_us: Arc<AtomicU64>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Forwards 127.0.0.1:<port> to `target` (host:port).
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let p = Proxy {
            port,
            up: Arc::new(AtomicBool::new(true)),
            delay_us: Arc::new(AtomicU64::new(0)),
            open: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (up, delay, open, stop, target) = (
            p.up.clone(),
            p.delay_us.clone(),
            p.open.clone(),
            p.stop.clone(),
            target.to_string(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                if !up.load(Ordering::Relaxed) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                {
                    let mut o = open.lock().unwrap();
                    o.push(client.try_clone().unwrap());
                    o.push(server.try_clone().unwrap());
                }
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    delay.clone(),
                );
                pipe(server, client, Arc::new(AtomicU64::new(0)));
            }
        });
        p
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Refuses new connections and cuts the open ones.
    pub fn down(&self) {
        self.up.store(false, Ordering::Relaxed);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::Relaxed);
    }

    /// Slows traffic towards the server to about `bytes_per_sec`.
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.delay_us
            .store(65_536 * 1_000_000 / bytes_per_sec.max(1), Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.down();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, delay_us: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let d = delay_us.load(Ordering::Relaxed);
            if d > 0 {
                std::thread::sleep(Duration::from_micros(d * n as u64 / 65_536));
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
