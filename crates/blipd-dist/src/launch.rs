//! `blipd launch`: a torchrun-style launcher for one machine. Spawns `nproc` copies of a command with
//! `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` set, forwards their
//! exit, and when one worker fails, terminates the rest (so a crash never leaves peers hanging in a
//! collective).

use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use crate::DistError;

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub program: std::path::PathBuf,
    pub args: Vec<String>,
}

/// How the workers ended.
#[derive(Debug)]
pub struct LaunchOutcome {
    /// Exit status per local rank.
    pub statuses: Vec<ExitStatus>,
    /// The local rank that failed first (by the time its process ended), if any.
    pub first_failure: Option<usize>,
    /// Local ranks in the order their processes ended (the ones the launcher stopped included).
    pub exit_order: Vec<usize>,
    /// Local ranks the launcher stopped after the first failure.
    pub stopped: Vec<usize>,
}

impl LaunchOutcome {
    /// One line for the user: which rank failed first and how, then what happened to the others
    /// (`first rank` is the global rank of local rank 0 on this node).
    pub fn failure_summary(&self, first_rank: usize) -> Option<String> {
        let first = self.first_failure?;
        let mut others = Vec::new();
        for &i in &self.exit_order {
            if i == first {
                continue;
            }
            let what = if self.stopped.contains(&i) {
                "stopped by the launcher".to_string()
            } else {
                format!("then exited with {}", self.statuses[i])
            };
            others.push(format!("rank {} {what}", first_rank + i));
        }
        Some(format!(
            "rank {} (local rank {first}) failed first, {}{}{}",
            first_rank + first,
            self.statuses[first],
            if others.is_empty() { "" } else { "; " },
            others.join("; ")
        ))
    }
}

/// Spawn the workers and wait for them. When one fails, the others are stopped (SIGKILL), so a crash
/// never leaves peers blocked in a collective. Which rank failed first is decided by the time each
/// process ended (a rank whose peer died usually fails too, a moment later).
pub fn launch(spec: &LaunchSpec) -> Result<LaunchOutcome, DistError> {
    let world = spec.nproc_per_node * spec.nnodes;
    let mut children: Vec<Child> = Vec::with_capacity(spec.nproc_per_node);
    for local in 0..spec.nproc_per_node {
        let rank = spec.node_rank * spec.nproc_per_node + local;
        let spawned = Command::new(&spec.program)
            .args(&spec.args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", spec.nproc_per_node.to_string())
            .env("MASTER_ADDR", &spec.master_addr)
            .env("MASTER_PORT", spec.master_port.to_string())
            .spawn();
        match spawned {
            Ok(child) => children.push(child),
            Err(e) => {
                for c in &mut children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(DistError::Io {
                    rank,
                    op: "launch".into(),
                    message: format!("spawning {}: {e}", spec.program.display()),
                });
            }
        }
    }
    let n = children.len();
    let ended = exit_notifications(&children);
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; n];
    let mut exit_order = Vec::with_capacity(n);
    let mut stopped = Vec::new();
    let mut first_failure = None;
    while exit_order.len() < n {
        let i = match &ended {
            Some(rx) => rx.recv().ok(),
            None => None,
        };
        // Without notifications (or once their threads are gone), poll.
        let done: Vec<usize> = match i {
            Some(i) => vec![i],
            None => {
                std::thread::sleep(Duration::from_millis(20));
                (0..n).filter(|&i| statuses[i].is_none()).collect()
            }
        };
        for i in done {
            if statuses[i].is_some() {
                continue;
            }
            let st = match children[i].try_wait() {
                Ok(Some(st)) => st,
                Ok(None) => continue,
                Err(e) => {
                    return Err(DistError::Io {
                        rank: i,
                        op: "launch (wait)".into(),
                        message: e.to_string(),
                    })
                }
            };
            statuses[i] = Some(st);
            exit_order.push(i);
            if !st.success() && first_failure.is_none() {
                first_failure = Some(i);
                tracing::error!("local rank {i} exited with {st}; stopping the other workers");
                for (j, c) in children.iter_mut().enumerate() {
                    if statuses[j].is_none() {
                        let _ = c.kill();
                        stopped.push(j);
                    }
                }
            }
        }
    }
    Ok(LaunchOutcome {
        statuses: statuses
            .into_iter()
            .map(|s| s.expect("all waited"))
            .collect(),
        first_failure,
        exit_order,
        stopped,
    })
}

/// A channel that receives each child's index the moment its process ends, in that order. Each
/// watcher thread waits with `waitid(WNOWAIT)`, which does not reap the child: its pid stays
/// reserved until the launcher's `try_wait`, so stopping the others can never hit a reused pid.
#[cfg(unix)]
fn exit_notifications(children: &[Child]) -> Option<std::sync::mpsc::Receiver<usize>> {
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, c) in children.iter().enumerate() {
        let pid = c.id() as libc::id_t;
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("launch-wait-{i}"))
            .spawn(move || {
                loop {
                    // SAFETY: waitid writes only into `info`, a zeroed siginfo_t we own.
                    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                    let r = unsafe {
                        libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT)
                    };
                    if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)
                    {
                        break;
                    }
                }
                let _ = tx.send(i);
            })
            .ok()?;
    }
    Some(rx)
}

#[cfg(not(unix))]
fn exit_notifications(_children: &[Child]) -> Option<std::sync::mpsc::Receiver<usize>> {
    None
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn spec(args: &[&str], n: usize) -> LaunchSpec {
        LaunchSpec {
            nproc_per_node: n,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29999,
            program: "/bin/sh".into(),
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn sets_rank_variables() {
        let dir = std::env::temp_dir().join(format!("blipd-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = format!(
            "echo $RANK $LOCAL_RANK $WORLD_SIZE $MASTER_PORT > {}/$RANK",
            dir.display()
        );
        let out = launch(&spec(&["-c", &script], 3)).unwrap();
        assert!(out.first_failure.is_none());
        for r in 0..3 {
            let s = std::fs::read_to_string(dir.join(r.to_string())).unwrap();
            assert_eq!(s.trim(), format!("{r} {r} 3 29999"));
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn one_failure_stops_the_rest() {
        let start = std::time::Instant::now();
        let out = launch(&spec(
            &["-c", "if [ $RANK = 1 ]; then exit 3; fi; sleep 30"],
            3,
        ))
        .unwrap();
        assert_eq!(out.first_failure, Some(1));
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(out.statuses.iter().all(|s| !s.success()));
    }

    /// The rank whose process ended first is named, not the lowest rank: here rank 1 dies and rank 0
    /// fails right after it (as a peer blocked in a collective would), before the launcher stops it.
    #[test]
    #[cfg(target_os = "linux")]
    fn the_rank_that_failed_first_is_named() {
        let dir = std::env::temp_dir().join(format!("blipd-launch-first-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let flag = dir.join("dead");
        let script = format!(
            "if [ $RANK = 1 ]; then echo $$ > {f}.tmp; mv {f}.tmp {f}; sleep 0.2; kill -9 $$; fi; \
             if [ $RANK = 0 ]; then while [ ! -e {f} ]; do :; done; p=$(cat {f}); \
             while ! grep -q ') Z' /proc/$p/stat; do :; done; exit 1; fi; sleep 30",
            f = flag.display()
        );
        for _ in 0..3 {
            let out = launch(&spec(&["-c", &script], 3)).unwrap();
            assert_eq!(out.first_failure, Some(1), "{out:?}");
            assert_eq!(out.exit_order[0], 1, "{out:?}");
            let line = out.failure_summary(0).unwrap();
            assert!(
                line.starts_with("rank 1 (local rank 1) failed first"),
                "{line}"
            );
            assert!(line.contains("signal: 9"), "{line}");
            assert!(line.contains("rank 2 stopped by the launcher"), "{line}");
            let _ = std::fs::remove_file(&flag);
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
