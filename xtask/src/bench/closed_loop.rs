//! A closed-loop HTTP client that keeps each request's latency and whether the server said it
//! was a slow one: wrk reports one latency distribution, in which the slow requests themselves
//! fill the tail, so it cannot show what a balancer does to the fast requests that wait behind
//! them.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

/// One request: how long it took (connect to the end of the answer) and whether it was slow.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub latency: Duration,
    pub slow: bool,
}

/// What a run recorded.
#[derive(Debug, Default)]
pub struct Recorded {
    pub requests: Vec<Request>,
    pub errors: u64,
    pub elapsed: Duration,
}

/// `connections` threads, each making one request at a time over a new connection
/// (`Connection: close`) for `seconds`. An answer whose body holds `slow_marker` is slow.
pub fn run(addr: SocketAddr, connections: u32, seconds: u32, slow_marker: &str) -> Recorded {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(u64::from(seconds));
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let marker = slow_marker.to_string();
            thread::spawn(move || {
                let mut recorded = Recorded::default();
                while Instant::now() < deadline {
                    let begun = Instant::now();
                    match one(addr) {
                        Some(body) => recorded.requests.push(Request {
                            latency: begun.elapsed(),
                            slow: body.contains(&marker),
                        }),
                        None => recorded.errors += 1,
                    }
                }
                recorded
            })
        })
        .collect();
    let mut all = Recorded::default();
    for handle in threads {
        if let Ok(part) = handle.join() {
            all.requests.extend(part.requests);
            all.errors += part.errors;
        }
    }
    all.elapsed = started.elapsed();
    all
}

/// One GET; the answer's text if it was a 200.
fn one(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.starts_with("HTTP/1.1 200").then_some(answer)
}

/// The `q` quantile (0..=1) of `latencies`, in ms; None for none.
pub fn quantile_ms(latencies: &mut [Duration], q: f64) -> Option<f64> {
    if latencies.is_empty() {
        return None;
    }
    latencies.sort_unstable();
    let rank = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len());
    Some(latencies[rank - 1].as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut ms: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(quantile_ms(&mut ms, 0.5), Some(50.0));
        assert_eq!(quantile_ms(&mut ms, 0.99), Some(99.0));
        assert_eq!(quantile_ms(&mut ms, 1.0), Some(100.0));
        assert_eq!(quantile_ms(&mut [], 0.5), None);
    }
}
