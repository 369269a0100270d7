//! NCCL all-reduce of a 1 GiB fp32 buffer against a device-to-device copy of the same buffer, on this
//! rank's GPU (`LOCAL_RANK`), as nccl-tests reports them: algorithm bandwidth = bytes / time, bus
//! bandwidth = algbw · 2(W−1)/W.
//!
//!     cargo run --release -p blipd-dist --features nccl --example nccl_bandwidth            # 1 GPU
//!     blipd launch --nproc-per-node 8 -- …   # or torchrun: run this binary once per GPU
//!
//! Prints one JSON line per rank. Env: `BLIPD_BW_MIB` (buffer size, default 1024), `BLIPD_BW_ITERS`
//! (default 20).

use std::time::Instant;

use blipd_dist::nccl::NcclGroup;
use blipd_dist::{RendezvousConfig, World};

fn env_usize(k: &str, default: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let world = World::from_env()?;
    let mib = env_usize("BLIPD_BW_MIB", 1024);
    let iters = env_usize("BLIPD_BW_ITERS", 20).max(1);
    let n = mib * 1024 * 1024 / 4;
    let bytes = (n * 4) as f64;
    let mut group = NcclGroup::establish(&world, world.local_rank, RendezvousConfig::default())?;
    let stream = group.comm.stream().clone();
    let mut a = stream.alloc_zeros::<f32>(n)?;
    let mut b = stream.alloc_zeros::<f32>(n)?;
    for _ in 0..3 {
        group
            .comm
            .all_reduce_f32(&mut a, false, "warm-up all-reduce")?;
        stream.memcpy_dtod(&a, &mut b)?;
    }
    stream.synchronize()?;

    let t = Instant::now();
    for _ in 0..iters {
        group
            .comm
            .all_reduce_f32(&mut a, false, "timed all-reduce")?;
    }
    let ar = t.elapsed().as_secs_f64() / iters as f64;

    let t = Instant::now();
    for _ in 0..iters {
        stream.memcpy_dtod(&a, &mut b)?;
    }
    stream.synchronize()?;
    let cp = t.elapsed().as_secs_f64() / iters as f64;

    let w = world.world_size as f64;
    let algbw = bytes / ar / 1e9;
    println!(
        "{{\"rank\": {}, \"world_size\": {}, \"bytes\": {bytes}, \"allreduce_ms\": {:.3}, \
         \"allreduce_algbw_gbs\": {algbw:.1}, \"allreduce_busbw_gbs\": {:.1}, \"d2d_copy_ms\": {:.3}, \
         \"d2d_copy_gbs\": {:.1}, \"d2d_read_plus_write_gbs\": {:.1}}}",
        world.rank,
        world.world_size,
        ar * 1e3,
        algbw * 2.0 * (w - 1.0) / w,
        cp * 1e3,
        bytes / cp / 1e9,
        2.0 * bytes / cp / 1e9
    );
    group.rv.barrier("end of benchmark")?;
    Ok(())
}
