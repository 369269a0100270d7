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
    /// The first local rank that failed, if any.
    pub first_failure: Option<usize>,
}

/// Spawn the workers and wait for them.
pub fn launch(spec: &LaunchSpec) -> Result<LaunchOutcome, DistError> {
    let world = spec.nproc_per_node * spec.nnodes;
    let mut children: Vec<Child> = Vec::with_capacity(spec.nproc_per_node);
    for local in 0..spec.nproc_per_node {
        let rank = spec.node_rank * spec.nproc_per_node + local;
        let child = Command::new(&spec.program)
            .args(&spec.args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", spec.nproc_per_node.to_string())
            .env("MASTER_ADDR", &spec.master_addr)
            .env("MASTER_PORT", spec.master_port.to_string())
            .spawn()
            .map_err(|e| DistError::Io {
                rank,
                op: "launch".into(),
                message: format!("spawning {}: {e}", spec.program.display()),
            })?;
        children.push(child);
    }
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; children.len()];
    let mut first_failure = None;
    while statuses.iter().any(Option::is_none) {
        for (i, c) in children.iter_mut().enumerate() {
            if statuses[i].is_some() {
                continue;
            }
            match c.try_wait() {
                Ok(Some(st)) => {
                    if !st.success() && first_failure.is_none() {
                        first_failure = Some(i);
                        tracing::error!(
                            "local rank {i} exited with {st}; stopping the other workers"
                        );
                    }
                    statuses[i] = Some(st);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(DistError::Io {
                        rank: i,
                        op: "launch (wait)".into(),
                        message: e.to_string(),
                    })
                }
            }
        }
        if first_failure.is_some() {
            for (i, c) in children.iter_mut().enumerate() {
                if statuses[i].is_none() {
                    let _ = c.kill();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(LaunchOutcome {
        statuses: statuses
            .into_iter()
            .map(|s| s.expect("all waited"))
            .collect(),
        first_failure,
    })
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
}
