//! Picking a TCP port to serve on.
//!
//! Asking the kernel for port 0 and closing the listener again (the usual trick) hands out a port from
//! the *ephemeral* range, the same range the kernel draws from for the local end of every outgoing
//! connection. Between the pick and the real `bind`, any connection made on the machine — another
//! rank joining a rendezvous, a test running beside this one — can take that port, and the `bind` then
//! fails with "Address already in use". That happened in CI. So we pick from *below* the ephemeral
//! range, where the kernel never puts an outgoing connection, start at a place that depends on the
//! process id, and never hand out the same port twice in one process.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// Lowest port we hand out; the registered-service ports below it are left alone.
const FIRST: u32 = 20_000;

/// A TCP port that is free on every interface right now, outside the kernel's ephemeral range, and
/// different from every port this function returned before in this process.
pub fn unused_port() -> std::io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let end = ephemeral_start().max(FIRST + 1_000);
    let span = end - FIRST;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span.min(4_000) {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + n) % span) as u16;
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    // Every candidate is taken (a very busy machine): fall back to the kernel's choice.
    Ok(TcpListener::bind("0.0.0.0:0")?.local_addr()?.port())
}

/// The first port of the kernel's ephemeral range (Linux: `ip_local_port_range`; IANA's 49152
/// elsewhere).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .filter(|&p: &u32| p > FIRST && p <= 65_535)
        .unwrap_or(49_152)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        // Each port is bound right after it is handed out. Processes started by the tests running
        // beside this one (the launcher's workers) pick ports from the same range, so one may take a
        // port between the pick and this bind ("in use"); that may happen rarely, nothing else may.
        let mut taken = Vec::new();
        let ports: Vec<u16> = (0..50)
            .map(|_| {
                let p = unused_port().unwrap();
                if let Err(e) = TcpListener::bind(("0.0.0.0", p)) {
                    assert_eq!(
                        e.kind(),
                        std::io::ErrorKind::AddrInUse,
                        "port {p} was handed out but cannot be bound: {e}"
                    );
                    taken.push(p);
                }
                p
            })
            .collect();
        assert!(
            taken.len() <= 2,
            "taken right after being handed out: {taken:?}"
        );
        let mut sorted = ports.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ports.len(), "{ports:?}");
        for &p in &ports {
            assert!((p as u32) >= FIRST && (p as u32) < ephemeral_start().max(FIRST + 1_000));
        }
    }
}
