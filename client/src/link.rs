//! A user-space link emulator: a TCP relay that adds one-way latency and a rate limit.
//!
//! This machine's kernel has no netem, so benchmarks that want a LAN or WAN profile put
//! this relay between client and server. It forwards the bytes (TLS records) unchanged,
//! in both directions, and models each direction as a serialising link of `rate` bits/s
//! followed by a wire of `delay` one-way latency:
//!
//! ```text
//!   client --tcp--> [reader] --(depart = max(now, link free) + len/rate)--> [queue]
//!          --(deliver at depart + delay)--> [writer] --tcp--> server      (and back)
//! ```
//!
//! Threads and blocking sockets are used rather than tokio timers: tokio's timer wheel has
//! millisecond resolution, too coarse for a 0.3 ms LAN; `std::thread::sleep` on Linux is
//! accurate to tens of microseconds. Bytes forwarded are counted per direction, so a report
//! can put the bytes on the wire (with TLS and HTTP/2 framing) next to the payload bytes
//! the protocol's counting channel saw.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// One direction's link: rate and one-way delay.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LinkProfile {
    /// profile name as given (`lan`, `wan`, or `RATE/DELAY`)
    #[serde(skip)]
    pub name: &'static str,
    /// bits per second, per direction
    pub rate_bits_per_sec: f64,
    /// one-way latency
    pub delay: Duration,
}

/// Errors of parsing a profile or running the relay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// A profile string that is not `lan`, `wan`, `wan100` or `RATE_MBIT/DELAY_MS`.
    #[error("unknown link profile {0:?}: use lan, wan, wan100 or RATE_MBIT/DELAY_MS (e.g. 100/40)")]
    BadProfile(String),
    /// A socket error.
    #[error("link emulator I/O: {0}")]
    Io(#[from] io::Error),
}

impl LinkProfile {
    /// LAN as in Cheetah's evaluation: 3 Gbit/s, 0.3 ms one way.
    pub const LAN: Self = Self {
        name: "lan",
        rate_bits_per_sec: 3e9,
        delay: Duration::from_micros(300),
    };
    /// WAN as in Cheetah's evaluation: 400 Mbit/s, 40 ms one way.
    pub const WAN: Self = Self {
        name: "wan",
        rate_bits_per_sec: 400e6,
        delay: Duration::from_millis(40),
    };
    /// A slower WAN: 100 Mbit/s, 40 ms one way.
    pub const WAN100: Self = Self {
        name: "wan100",
        rate_bits_per_sec: 100e6,
        delay: Duration::from_millis(40),
    };

    /// Parses `lan`, `wan`, `wan100` or `RATE_MBIT/DELAY_MS` (one-way delay).
    pub fn parse(s: &str) -> Result<Self, LinkError> {
        match s {
            "lan" => return Ok(Self::LAN),
            "wan" => return Ok(Self::WAN),
            "wan100" => return Ok(Self::WAN100),
            _ => {}
        }
        let bad = || LinkError::BadProfile(s.to_owned());
        let (rate, delay) = s.split_once('/').ok_or_else(bad)?;
        let rate: f64 = rate.trim().parse().map_err(|_| bad())?;
        let delay: f64 = delay.trim().parse().map_err(|_| bad())?;
        if !(rate > 0.0 && rate.is_finite() && (0.0..=10_000.0).contains(&delay)) {
            return Err(bad());
        }
        Ok(Self {
            name: "custom",
            rate_bits_per_sec: rate * 1e6,
            delay: Duration::from_secs_f64(delay / 1e3),
        })
    }

    /// The time a flight of `bytes` takes to serialise onto this link.
    pub fn serialisation(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 * 8.0 / self.rate_bits_per_sec)
    }

    /// The model the reports print next to the measured time:
    /// compute + rounds x one-way delay + bytes / rate (each flight crosses once).
    pub fn model_seconds(&self, compute_s: f64, flights: u64, bytes: u64) -> f64 {
        compute_s
            + flights as f64 * self.delay.as_secs_f64()
            + self.serialisation(bytes).as_secs_f64()
    }
}

/// Bytes the relay forwarded, per direction.
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// client -> server
    pub upstream_bytes: AtomicU64,
    /// server -> client
    pub downstream_bytes: AtomicU64,
}

impl LinkCounters {
    /// (client -> server, server -> client) bytes so far.
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.upstream_bytes.load(Ordering::Relaxed),
            self.downstream_bytes.load(Ordering::Relaxed),
        )
    }
}

/// A running relay. Dropping it stops accepting new connections; open ones end when either
/// side closes.
#[derive(Debug)]
pub struct LinkEmulator {
    addr: SocketAddr,
    counters: Arc<LinkCounters>,
    stop: Arc<AtomicBool>,
}

impl LinkEmulator {
    /// Listens on 127.0.0.1 (port 0) and relays every connection to `upstream`.
    pub fn start(upstream: SocketAddr, profile: LinkProfile) -> Result<Self, LinkError> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(LinkCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counters.clone(), stop.clone());
        thread::Builder::new()
            .name("link-accept".into())
            .spawn(move || accept_loop(listener, upstream, profile, c, s))?;
        Ok(Self {
            addr,
            counters,
            stop,
        })
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes forwarded so far.
    pub fn counters(&self) -> &LinkCounters {
        &self.counters
    }
}

impl Drop for LinkEmulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    profile: LinkProfile,
    counters: Arc<LinkCounters>,
    stop: Arc<AtomicBool>,
) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Ok(client) = conn else { continue };
        let Ok(server) = TcpStream::connect(upstream) else {
            tracing::warn!(%upstream, "link emulator: upstream refused the connection");
            continue;
        };
        if let Err(e) = relay_pair(client, server, profile, &counters) {
            tracing::warn!(error = %e, "link emulator: could not start a relay");
        }
    }
}

fn relay_pair(
    client: TcpStream,
    server: TcpStream,
    profile: LinkProfile,
    counters: &Arc<LinkCounters>,
) -> io::Result<()> {
    for s in [&client, &server] {
        s.set_nodelay(true)?;
    }
    let (c2, s2) = (client.try_clone()?, server.try_clone()?);
    let up = counters.clone();
    let down = counters.clone();
    spawn_direction(client, server, profile, move |n| {
        up.upstream_bytes.fetch_add(n, Ordering::Relaxed);
    })?;
    spawn_direction(s2, c2, profile, move |n| {
        down.downstream_bytes.fetch_add(n, Ordering::Relaxed);
    })?;
    Ok(())
}

/// One direction: a reader that timestamps chunks and a writer that delivers them on time.
fn spawn_direction(
    mut from: TcpStream,
    mut to: TcpStream,
    profile: LinkProfile,
    count: impl Fn(u64) + Send + 'static,
) -> io::Result<()> {
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(1024);
    thread::Builder::new()
        .name("link-read".into())
        .spawn(move || {
            let mut link_free = Instant::now();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let now = Instant::now();
                // The link serialises one chunk after another at the rate (a token bucket with
                // a one-chunk burst), then the wire adds the delay.
                link_free = link_free.max(now) + profile.serialisation(n as u64);
                if tx
                    .send((link_free + profile.delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
            let _ = from.shutdown(Shutdown::Read);
        })?;
    thread::Builder::new()
        .name("link-write".into())
        .spawn(move || {
            while let Ok((at, chunk)) = rx.recv() {
                sleep_until(at);
                // Counted as delivered before the write, so a reader that has seen the bytes
                // also sees them counted.
                count(chunk.len() as u64);
                if to.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        })?;
    Ok(())
}

/// Sleeps until `at`, finishing with a short spin for sub-100-microsecond accuracy.
fn sleep_until(at: Instant) {
    loop {
        let now = Instant::now();
        if now >= at {
            return;
        }
        let left = at - now;
        if left > Duration::from_micros(200) {
            thread::sleep(left - Duration::from_micros(100));
        } else {
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback; returns its address.
    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                thread::spawn(move || {
                    let mut r = c.try_clone().unwrap();
                    let _ = io::copy(&mut r, &mut c);
                });
            }
        });
        addr
    }

    #[test]
    fn profiles_parse() {
        assert_eq!(LinkProfile::parse("lan").unwrap(), LinkProfile::LAN);
        assert_eq!(LinkProfile::parse("wan").unwrap(), LinkProfile::WAN);
        let p = LinkProfile::parse("100/40").unwrap();
        assert_eq!(p.rate_bits_per_sec, 100e6);
        assert_eq!(p.delay, Duration::from_millis(40));
        for bad in ["", "fast", "0/10", "100/", "x/1", "100/-1"] {
            assert!(LinkProfile::parse(bad).is_err(), "{bad}");
        }
        // 1 MB at 400 Mbit/s = 20 ms; 3 flights at 40 ms = 120 ms.
        let m = LinkProfile::WAN.model_seconds(0.5, 3, 1_000_000);
        assert!((m - 0.64).abs() < 1e-9);
    }

    #[test]
    fn relay_forwards_bytes_unchanged_and_counts_them() {
        let emu =
            LinkEmulator::start(echo_server(), LinkProfile::parse("1000/0").unwrap()).unwrap();
        let mut s = TcpStream::connect(emu.local_addr()).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 256) as u8).collect();
        let mut w = s.try_clone().unwrap();
        let d2 = data.clone();
        let t = thread::spawn(move || w.write_all(&d2).unwrap());
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back).unwrap();
        t.join().unwrap();
        assert_eq!(back, data);
        assert_eq!(
            emu.counters().upstream_bytes.load(Ordering::Relaxed),
            300_000
        );
        assert_eq!(
            emu.counters().downstream_bytes.load(Ordering::Relaxed),
            300_000
        );
    }

    /// The emulator never delivers early (a hard guarantee: asserted exactly) and is not
    /// grossly late (a loose bound: the machine is shared and noisy).
    #[test]
    fn relay_holds_latency_within_tolerance() {
        let profile = LinkProfile::parse("1000/20").unwrap();
        let emu = LinkEmulator::start(echo_server(), profile).unwrap();
        let mut s = TcpStream::connect(emu.local_addr()).unwrap();
        s.set_nodelay(true).unwrap();
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let t0 = Instant::now();
            s.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            let rtt = t0.elapsed();
            assert!(
                rtt >= Duration::from_millis(40),
                "round trip {rtt:?} under 2 x 20 ms"
            );
            best = best.min(rtt);
        }
        assert!(
            best < Duration::from_millis(40 + 60),
            "best round trip {best:?}"
        );
    }

    #[test]
    fn relay_holds_rate_within_tolerance() {
        // 2 MB through 80 Mbit/s takes at least 200 ms one way.
        let profile = LinkProfile::parse("80/0").unwrap();
        let emu = LinkEmulator::start(echo_server(), profile).unwrap();
        let mut s = TcpStream::connect(emu.local_addr()).unwrap();
        let data = vec![0x5au8; 2_000_000];
        let mut w = s.try_clone().unwrap();
        let t0 = Instant::now();
        let t = thread::spawn(move || w.write_all(&data).unwrap());
        let mut back = vec![0u8; 2_000_000];
        s.read_exact(&mut back).unwrap();
        let took = t0.elapsed();
        t.join().unwrap();
        let floor = profile.serialisation(2_000_000);
        assert!(
            took >= floor,
            "{took:?} faster than the link allows ({floor:?})"
        );
        assert!(took < floor * 4 + Duration::from_millis(500), "{took:?}");
    }
}
