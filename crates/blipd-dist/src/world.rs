//! The process's place in the job, read from the launcher's environment.
//!
//! torchrun (and `blipd launch`) sets `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`. Under `srun`, SLURM sets `SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_NTASKS`,
//! `SLURM_NTASKS_PER_NODE` and `SLURM_JOB_NODELIST`; the master is the first host of the node list and the
//! port comes from `MASTER_PORT` or a default derived from the job id. Without either, the world is one
//! process.

use crate::DistError;

/// Which launcher described the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    Single,
    Torchrun,
    Slurm,
}

/// Rank layout and master address of a data-parallel job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub launcher: Launcher,
}

/// Default rendezvous port (torchrun's default).
pub const DEFAULT_PORT: u16 = 29500;

impl World {
    /// A single process.
    pub fn single() -> Self {
        Self {
            rank: 0,
            local_rank: 0,
            world_size: 1,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_PORT,
            launcher: Launcher::Single,
        }
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Read the world from the process environment.
    pub fn from_env() -> Result<Self, DistError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Read the world from any variable lookup (testable).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, DistError> {
        let w = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            let world_size = parse(&get, "WORLD_SIZE")?.unwrap_or(1);
            let rank = parse(&get, "RANK")?.unwrap_or(0);
            let local_rank = parse(&get, "LOCAL_RANK")?.unwrap_or(rank);
            let local_world_size = parse(&get, "LOCAL_WORLD_SIZE")?.unwrap_or(world_size);
            World {
                rank,
                local_rank,
                world_size,
                local_world_size,
                master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                master_port: parse(&get, "MASTER_PORT")?.unwrap_or(DEFAULT_PORT as usize) as u16,
                launcher: Launcher::Torchrun,
            }
        } else if get("SLURM_PROCID").is_some() {
            let world_size = parse(&get, "SLURM_NTASKS")?.unwrap_or(1);
            let rank = parse(&get, "SLURM_PROCID")?.unwrap_or(0);
            let local_rank = parse(&get, "SLURM_LOCALID")?.unwrap_or(0);
            let local_world_size = match get("SLURM_NTASKS_PER_NODE") {
                // e.g. "8" or "8(x2)"
                Some(v) => v
                    .split('(')
                    .next()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| env_err("SLURM_NTASKS_PER_NODE", &v, "expected a count"))?,
                None => world_size,
            };
            let master_addr = match get("MASTER_ADDR") {
                Some(a) => a,
                None => {
                    let list = get("SLURM_JOB_NODELIST")
                        .or_else(|| get("SLURM_NODELIST"))
                        .unwrap_or_else(|| "127.0.0.1".into());
                    first_host(&list).ok_or_else(|| {
                        env_err("SLURM_JOB_NODELIST", &list, "no host in the list")
                    })?
                }
            };
            let master_port = match parse(&get, "MASTER_PORT")? {
                Some(p) => p as u16,
                None => match parse(&get, "SLURM_JOB_ID")? {
                    // A port in [20000, 30000) derived from the job id, the same on every node.
                    Some(id) => 20000 + (id % 10000) as u16,
                    None => DEFAULT_PORT,
                },
            };
            World {
                rank,
                local_rank,
                world_size,
                local_world_size,
                master_addr,
                master_port,
                launcher: Launcher::Slurm,
            }
        } else {
            return Ok(World::single());
        };
        w.validate()?;
        Ok(w)
    }

    fn validate(&self) -> Result<(), DistError> {
        if self.world_size == 0 {
            return Err(env_err("WORLD_SIZE", "0", "must be at least 1"));
        }
        if self.rank >= self.world_size {
            return Err(env_err(
                "RANK",
                &self.rank.to_string(),
                &format!("must be below WORLD_SIZE={}", self.world_size),
            ));
        }
        if self.local_rank >= self.local_world_size.max(1) {
            return Err(env_err(
                "LOCAL_RANK",
                &self.local_rank.to_string(),
                &format!("must be below LOCAL_WORLD_SIZE={}", self.local_world_size),
            ));
        }
        Ok(())
    }
}

fn env_err(var: &str, value: &str, message: &str) -> DistError {
    DistError::Env {
        var: var.into(),
        value: value.into(),
        message: message.into(),
    }
}

fn parse(get: &impl Fn(&str) -> Option<String>, var: &str) -> Result<Option<usize>, DistError> {
    match get(var) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|_| env_err(var, &v, "expected a non-negative integer")),
    }
}

/// The first host of a SLURM node list: `gpu[003-010,012],cpu1` → `gpu003`; `a,b` → `a`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    if list.is_empty() {
        return None;
    }
    // Split on the first comma that is not inside brackets.
    let mut depth = 0;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let first = &list[..end];
    match first.find('[') {
        None => Some(first.to_string()),
        Some(open) => {
            let prefix = &first[..open];
            let inner = first[open + 1..].trim_end_matches(']');
            let range = inner.split(',').next()?;
            let start = range.split('-').next()?;
            Some(format!("{prefix}{start}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn single_without_launcher() {
        assert_eq!(World::from_vars(vars(&[])).unwrap(), World::single());
    }

    #[test]
    fn torchrun_variables() {
        let w = World::from_vars(vars(&[
            ("RANK", "5"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap();
        assert_eq!(
            (w.rank, w.local_rank, w.world_size, w.local_world_size),
            (5, 1, 8, 4)
        );
        assert_eq!((w.master_addr.as_str(), w.master_port), ("node0", 1234));
        assert_eq!(w.launcher, Launcher::Torchrun);
    }

    #[test]
    fn slurm_variables() {
        let w = World::from_vars(vars(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_NTASKS_PER_NODE", "8(x2)"),
            ("SLURM_JOB_NODELIST", "gpu[003-004,010]"),
            ("SLURM_JOB_ID", "123456"),
        ]))
        .unwrap();
        assert_eq!(
            (w.rank, w.local_rank, w.world_size, w.local_world_size),
            (9, 1, 16, 8)
        );
        assert_eq!(w.master_addr, "gpu003");
        assert_eq!(w.master_port, 20000 + 3456);
        assert_eq!(w.launcher, Launcher::Slurm);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = World::from_vars(vars(&[("RANK", "x"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("RANK"), "{e}");
        let e = World::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(e.to_string().contains("WORLD_SIZE=2"), "{e}");
    }

    #[test]
    fn node_lists() {
        assert_eq!(first_host("a,b").as_deref(), Some("a"));
        assert_eq!(first_host("n[1-3],m").as_deref(), Some("n1"));
        assert_eq!(first_host("gpu[07,09]").as_deref(), Some("gpu07"));
        assert_eq!(first_host("solo").as_deref(), Some("solo"));
        assert_eq!(first_host(""), None);
    }
}
