//! TCP rendezvous and control channel.
//!
//! Rank 0 listens on `MASTER_ADDR:MASTER_PORT`; every other rank connects (retrying until a deadline),
//! says who it is (rank, world size) and receives rank 0's payload — the NCCL unique id on GPUs, or
//! nothing on the CPU path. Rank 0 checks that every rank reports the same world size, that no rank joins
//! twice and that all ranks arrive before the deadline; each failure is an error naming the rank, never a
//! hang. The connections stay open as a star-shaped control channel for small collectives: barriers,
//! broadcasts of collective decisions ("save now?", "stop now?") and, for the CPU test path, a
//! deterministic sum all-reduce (rank 0 adds contributions in rank order, then broadcasts).
//! Every operation has a timeout; a dead peer surfaces as [`DistError::Timeout`] or [`DistError::Io`]
//! naming the rank and the operation.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::{DistError, World};

const MAGIC: &[u8; 4] = b"BLPD";
const VERSION: u32 = 1;

/// Deadlines of the rendezvous and of each collective.
#[derive(Debug, Clone)]
pub struct RendezvousConfig {
    /// How long rank 0 waits for everyone, and how long others keep retrying to connect.
    pub join_timeout: Duration,
    /// Timeout of one collective operation on the control channel.
    pub op_timeout: Duration,
}

impl Default for RendezvousConfig {
    fn default() -> Self {
        Self {
            join_timeout: Duration::from_secs(300),
            op_timeout: Duration::from_secs(600),
        }
    }
}

/// An established group: rank 0 holds one stream per peer (index = rank), peers hold one to rank 0.
pub struct Rendezvous {
    pub world: World,
    pub payload: Vec<u8>,
    cfg: RendezvousConfig,
    peers: Vec<Option<TcpStream>>,
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendezvous")
            .field("world", &self.world)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl Rendezvous {
    /// Join the group described by `world`. Rank 0 serves `payload` (ignored on other ranks).
    pub fn establish(
        world: &World,
        payload: &[u8],
        cfg: RendezvousConfig,
    ) -> Result<Self, DistError> {
        if world.world_size == 1 {
            return Ok(Self {
                world: world.clone(),
                payload: payload.to_vec(),
                cfg,
                peers: vec![],
            });
        }
        if world.rank == 0 {
            Self::serve(world, payload, cfg)
        } else {
            Self::join(world, cfg)
        }
    }

    /// The address peers can reach this rank at: rank 0's is `MASTER_ADDR` resolved; another
    /// rank's is the local address of its connection to rank 0 (the interface that routes to the
    /// master, as NCCL picks its socket interface). `None` for a world of one.
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        if self.world.rank == 0 {
            (self.world.master_addr.as_str(), self.world.master_port)
                .to_socket_addrs()
                .ok()?
                .next()
                .map(|a| a.ip())
        } else {
            self.peers
                .first()?
                .as_ref()?
                .local_addr()
                .ok()
                .map(|a| a.ip())
        }
    }

    fn serve(world: &World, payload: &[u8], cfg: RendezvousConfig) -> Result<Self, DistError> {
        let op = "rendezvous (serve)";
        let io = |m: String| DistError::Io {
            rank: 0,
            op: op.into(),
            message: m,
        };
        let listener = TcpListener::bind(("0.0.0.0", world.master_port))
            .map_err(|e| io(format!("bind 0.0.0.0:{}: {e}", world.master_port)))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io(e.to_string()))?;
        let start = Instant::now();
        let mut peers: Vec<Option<TcpStream>> = (0..world.world_size).map(|_| None).collect();
        let mut joined = 1;
        while joined < world.world_size {
            if start.elapsed() > cfg.join_timeout {
                let missing: Vec<String> = (1..world.world_size)
                    .filter(|r| peers[*r].is_none())
                    .map(|r| r.to_string())
                    .collect();
                return Err(DistError::Timeout {
                    rank: 0,
                    op: op.into(),
                    secs: cfg.join_timeout.as_secs_f64(),
                    detail: format!("ranks never joined: {}", missing.join(", ")),
                });
            }
            let (mut stream, addr) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(io(e.to_string())),
            };
            stream
                .set_nonblocking(false)
                .map_err(|e| io(e.to_string()))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| io(e.to_string()))?;
            let _ = stream.set_nodelay(true);
            let mut hello = [0u8; 16];
            if stream.read_exact(&mut hello).is_err() || &hello[0..4] != MAGIC {
                tracing::warn!("rendezvous: ignoring a connection from {addr} that did not greet");
                continue;
            }
            let version = u32::from_le_bytes(hello[4..8].try_into().unwrap_or_default());
            let rank = u32::from_le_bytes(hello[8..12].try_into().unwrap_or_default()) as usize;
            let their_world =
                u32::from_le_bytes(hello[12..16].try_into().unwrap_or_default()) as usize;
            let reject = |stream: &mut TcpStream, message: String| {
                let _ = write_frame(stream, 1, message.as_bytes());
                DistError::Rejected { rank, message }
            };
            if version != VERSION {
                return Err(reject(
                    &mut stream,
                    format!("protocol version {version}, rank 0 speaks {VERSION}"),
                ));
            }
            if their_world != world.world_size {
                return Err(reject(
                    &mut stream,
                    format!(
                        "rank {rank} (from {addr}) has WORLD_SIZE={their_world}, rank 0 has {}",
                        world.world_size
                    ),
                ));
            }
            if rank == 0 || rank >= world.world_size {
                return Err(reject(
                    &mut stream,
                    format!(
                        "rank {rank} (from {addr}) is out of range 1..{}",
                        world.world_size
                    ),
                ));
            }
            if peers[rank].is_some() {
                return Err(reject(
                    &mut stream,
                    format!("rank {rank} joined twice (second time from {addr})"),
                ));
            }
            peers[rank] = Some(stream);
            joined += 1;
            tracing::debug!(
                "rendezvous: rank {rank} joined from {addr} ({joined}/{})",
                world.world_size
            );
        }
        for (r, s) in peers.iter_mut().enumerate() {
            if let Some(s) = s {
                write_frame(s, 0, payload).map_err(|e| DistError::Io {
                    rank: r,
                    op: op.into(),
                    message: e.to_string(),
                })?;
            }
        }
        let mut rv = Self {
            world: world.clone(),
            payload: payload.to_vec(),
            cfg,
            peers,
        };
        rv.set_timeouts()?;
        Ok(rv)
    }

    fn join(world: &World, cfg: RendezvousConfig) -> Result<Self, DistError> {
        let op = "rendezvous (join)";
        let start = Instant::now();
        let target = format!("{}:{}", world.master_addr, world.master_port);
        let mut last_err = String::new();
        let mut stream = loop {
            if start.elapsed() > cfg.join_timeout {
                return Err(DistError::Timeout {
                    rank: world.rank,
                    op: op.into(),
                    secs: cfg.join_timeout.as_secs_f64(),
                    detail: format!("could not reach rank 0 at {target}: {last_err}"),
                });
            }
            let addrs: Vec<_> = match target.to_socket_addrs() {
                Ok(a) => a.collect(),
                Err(e) => {
                    last_err = e.to_string();
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            match addrs
                .iter()
                .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).ok())
            {
                Some(s) => break s,
                None => {
                    last_err = "connection refused".into();
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let mut hello = Vec::with_capacity(16);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&VERSION.to_le_bytes());
        hello.extend_from_slice(&(world.rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world.world_size as u32).to_le_bytes());
        let io = |m: String| DistError::Io {
            rank: world.rank,
            op: op.into(),
            message: m,
        };
        stream.write_all(&hello).map_err(|e| io(e.to_string()))?;
        let remaining = cfg
            .join_timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(1));
        stream
            .set_read_timeout(Some(remaining))
            .map_err(|e| io(e.to_string()))?;
        let (status, payload) = read_frame(&mut stream)
            .map_err(|e| timeout_or_io(world.rank, op, &cfg, e, remaining))?;
        if status != 0 {
            return Err(DistError::Rejected {
                rank: world.rank,
                message: String::from_utf8_lossy(&payload).into_owned(),
            });
        }
        let mut peers: Vec<Option<TcpStream>> = (0..world.world_size).map(|_| None).collect();
        peers[0] = Some(stream);
        let mut rv = Self {
            world: world.clone(),
            payload,
            cfg,
            peers,
        };
        rv.set_timeouts()?;
        Ok(rv)
    }

    fn set_timeouts(&mut self) -> Result<(), DistError> {
        let t = Some(self.cfg.op_timeout);
        for (r, s) in self.peers.iter_mut().enumerate() {
            if let Some(s) = s {
                s.set_read_timeout(t)
                    .and_then(|_| s.set_write_timeout(t))
                    .map_err(|e| DistError::Io {
                        rank: r,
                        op: "set timeouts".into(),
                        message: e.to_string(),
                    })?;
            }
        }
        Ok(())
    }

    /// Sum `data` element-wise over all ranks, in place, identically on every rank. Rank 0 adds the
    /// contributions in rank order, so the result is deterministic.
    pub fn all_reduce_sum(&mut self, data: &mut [f32], op: &str) -> Result<(), DistError> {
        if self.world.world_size == 1 {
            return Ok(());
        }
        let bytes_len = data.len() * 4;
        if self.world.rank == 0 {
            let mut buf = vec![0u8; bytes_len];
            for r in 1..self.world.world_size {
                let s = self.peers[r].as_mut().expect("rank 0 holds every peer");
                let (_, got) = read_frame(s)
                    .map_err(|e| timeout_or_io(r, op, &self.cfg, e, self.cfg.op_timeout))?;
                if got.len() != bytes_len {
                    return Err(DistError::Io {
                        rank: r,
                        op: op.into(),
                        message: format!(
                            "sent {} bytes, expected {bytes_len}: the ranks are in different \
                             operations (that rank failed or diverged; its own error says where)",
                            got.len()
                        ),
                    });
                }
                buf.copy_from_slice(&got);
                for (d, c) in data.iter_mut().zip(buf.chunks_exact(4)) {
                    *d += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            let out = f32_bytes(data);
            for r in 1..self.world.world_size {
                let s = self.peers[r].as_mut().expect("rank 0 holds every peer");
                write_frame(s, 0, &out)
                    .map_err(|e| timeout_or_io(r, op, &self.cfg, e, self.cfg.op_timeout))?;
            }
        } else {
            let rank = self.world.rank;
            let s = self.peers[0].as_mut().expect("peers hold rank 0");
            write_frame(s, 0, &f32_bytes(data))
                .map_err(|e| timeout_or_io(0, op, &self.cfg, e, self.cfg.op_timeout))?;
            let (_, got) = read_frame(s)
                .map_err(|e| timeout_or_io(0, op, &self.cfg, e, self.cfg.op_timeout))?;
            if got.len() != bytes_len {
                return Err(DistError::Io {
                    rank,
                    op: op.into(),
                    message: format!(
                        "received {} bytes, expected {bytes_len}: the ranks are in different \
                         operations (see rank 0's error)",
                        got.len()
                    ),
                });
            }
            for (d, c) in data.iter_mut().zip(got.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(())
    }

    /// Broadcast bytes from rank 0 (the argument is ignored on other ranks); returns rank 0's bytes.
    pub fn broadcast(&mut self, bytes: &[u8], op: &str) -> Result<Vec<u8>, DistError> {
        if self.world.world_size == 1 {
            return Ok(bytes.to_vec());
        }
        if self.world.rank == 0 {
            for r in 1..self.world.world_size {
                let s = self.peers[r].as_mut().expect("rank 0 holds every peer");
                write_frame(s, 0, bytes)
                    .map_err(|e| timeout_or_io(r, op, &self.cfg, e, self.cfg.op_timeout))?;
            }
            Ok(bytes.to_vec())
        } else {
            let s = self.peers[0].as_mut().expect("peers hold rank 0");
            let (_, got) = read_frame(s)
                .map_err(|e| timeout_or_io(0, op, &self.cfg, e, self.cfg.op_timeout))?;
            Ok(got)
        }
    }

    /// A collective decision: true on every rank iff `flag` is true on any rank.
    pub fn any(&mut self, flag: bool, op: &str) -> Result<bool, DistError> {
        let mut v = [if flag { 1.0f32 } else { 0.0 }];
        self.all_reduce_sum(&mut v, op)?;
        Ok(v[0] > 0.0)
    }

    /// [`Rendezvous::barrier`] with its own timeout (e.g. a short probe that names a silent peer).
    pub fn barrier_within(&mut self, op: &str, timeout: Duration) -> Result<(), DistError> {
        let saved = self.cfg.op_timeout;
        self.cfg.op_timeout = timeout;
        let r = self.set_timeouts().and_then(|_| self.barrier(op));
        self.cfg.op_timeout = saved;
        let restored = self.set_timeouts();
        r.and(restored)
    }

    /// Wait until every rank reaches this point.
    pub fn barrier(&mut self, op: &str) -> Result<(), DistError> {
        let mut v = [0.0f32];
        self.all_reduce_sum(&mut v, op)
    }
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn timeout_or_io(
    rank: usize,
    op: &str,
    _cfg: &RendezvousConfig,
    e: std::io::Error,
    t: Duration,
) -> DistError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => DistError::Timeout {
            rank,
            op: op.into(),
            secs: t.as_secs_f64(),
            detail: format!("no answer from rank {rank}"),
        },
        _ => DistError::Io {
            rank,
            op: op.into(),
            message: format!("connection to rank {rank}: {e}"),
        },
    }
}

fn write_frame(s: &mut TcpStream, status: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = status;
    head[1..9].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)?;
    s.flush()
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..9].try_into().unwrap_or_default()) as usize;
    if len > (1 << 34) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)?;
    Ok((head[0], buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::Launcher;

    fn world(rank: usize, n: usize, port: u16) -> World {
        World {
            rank,
            local_rank: rank,
            world_size: n,
            local_world_size: n,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            launcher: Launcher::Torchrun,
        }
    }

    fn free_port() -> u16 {
        crate::unused_port().unwrap()
    }

    fn quick() -> RendezvousConfig {
        RendezvousConfig {
            join_timeout: Duration::from_secs(5),
            op_timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn three_ranks_share_payload_and_reduce() {
        let port = free_port();
        let handles: Vec<_> = (0..3)
            .map(|r| {
                std::thread::spawn(move || {
                    let mut rv =
                        Rendezvous::establish(&world(r, 3, port), b"nccl-id", quick()).unwrap();
                    assert_eq!(rv.payload, b"nccl-id");
                    let mut v = vec![r as f32, 1.0];
                    rv.all_reduce_sum(&mut v, "test all-reduce").unwrap();
                    assert_eq!(v, vec![3.0, 3.0]);
                    assert!(rv.any(r == 2, "decision").unwrap());
                    assert!(!rv.any(false, "decision").unwrap());
                    rv.barrier("end").unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn wrong_world_size_names_the_rank() {
        let port = free_port();
        let server =
            std::thread::spawn(move || Rendezvous::establish(&world(0, 2, port), b"", quick()));
        let peer = Rendezvous::establish(&world(1, 3, port), b"", quick()).unwrap_err();
        let server = server.join().unwrap().unwrap_err();
        assert!(server.to_string().contains("rank 1"), "{server}");
        assert!(server.to_string().contains("WORLD_SIZE=3"), "{server}");
        assert!(peer.to_string().contains("WORLD_SIZE=3"), "{peer}");
    }

    #[test]
    fn duplicate_rank_is_rejected() {
        let port = free_port();
        let server =
            std::thread::spawn(move || Rendezvous::establish(&world(0, 3, port), b"", quick()));
        let a = std::thread::spawn(move || Rendezvous::establish(&world(1, 3, port), b"", quick()));
        std::thread::sleep(Duration::from_millis(300));
        let b = Rendezvous::establish(&world(1, 3, port), b"", quick());
        let server = server.join().unwrap().unwrap_err();
        assert!(server.to_string().contains("joined twice"), "{server}");
        assert!(b.is_err() || a.join().unwrap().is_err());
    }

    #[test]
    fn missing_peer_times_out_naming_it() {
        let port = free_port();
        let mut cfg = quick();
        cfg.join_timeout = Duration::from_millis(500);
        let e = Rendezvous::establish(&world(0, 3, port), b"", cfg.clone()).unwrap_err();
        assert!(e.to_string().contains("ranks never joined: 1, 2"), "{e}");
        let e = Rendezvous::establish(&world(2, 3, free_port()), b"", cfg).unwrap_err();
        assert!(e.to_string().contains("rank 2"), "{e}");
    }

    #[test]
    fn dead_peer_surfaces_as_timeout_in_a_collective() {
        let port = free_port();
        let server = std::thread::spawn(move || {
            let mut rv = Rendezvous::establish(&world(0, 2, port), b"", quick()).unwrap();
            let mut v = vec![1.0f32];
            rv.all_reduce_sum(&mut v, "gradient all-reduce")
        });
        let peer = Rendezvous::establish(&world(1, 2, port), b"", quick()).unwrap();
        // The peer stays connected but never contributes.
        let started = Instant::now();
        let e = server.join().unwrap().unwrap_err();
        drop(peer);
        assert!(started.elapsed() < Duration::from_secs(5));
        let msg = e.to_string();
        assert!(
            msg.contains("gradient all-reduce") && msg.contains("rank 1"),
            "{msg}"
        );
    }
}
