//! What Troupe sees of this machine's NVIDIA GPUs: each device's identity
//! and memory, a few readings of its utilization, memory in use,
//! temperature and power through the NVML probe, and the same devices as
//! the GPU supervisor sees them (health, leasable capacity). Without an
//! NVIDIA driver it says so and exits: Troupe then runs on simulated GPUs.
//!
//! Run with `cargo run --release --example nvml_probe`.
//! `--quick` takes 2 readings 100 ms apart instead of 3 readings 500 ms
//! apart; `--data-dir DIR` is accepted like the other examples (nothing is
//! written: the supervisor here journals in memory).

use std::sync::Arc;
use std::time::Duration;

use troupe::gpu::probe::{DeviceSample, GpuProbe, NvmlProbe};
use troupe::gpu::{GpuArgs, GpuConfig, GpuError, GpuSupervisorHandle};
use troupe::prelude::*;

const GIB: f64 = (1u64 << 30) as f64;

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB)
}

/// A reading's optional fields: NVML may refuse them on some devices.
fn or_na<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map_or_else(|| "n/a (not reported)".to_owned(), show)
}

// ANCHOR: sample
fn print_sample(index: u32, reading: Result<DeviceSample, GpuError>) {
    match reading {
        Ok(s) => {
            println!(
                "    GPU {index}: utilization {} | memory {} of {} | {} | {}",
                or_na(s.utilization_pct, |u| format!("{u:3}%")),
                or_na(s.memory_used, |m| format!(
                    "{} ({:.1}%)",
                    gib(m),
                    100.0 * m as f64 / s.memory_total.max(1) as f64
                )),
                gib(s.memory_total),
                or_na(s.temperature_c, |t| format!("{t} °C")),
                or_na(s.power_mw, |p| format!("{:.1} W", p as f64 / 1000.0)),
            );
            // A refused field is unknown, not a failed device.
            for (field, why) in &s.refused {
                println!("      {field}: not reported ({why})");
            }
        }
        // The supervisor treats a failed reading as an unhealthy device.
        Err(e) => println!("    GPU {index}: n/a ({e}); Troupe would mark it unhealthy"),
    }
}
// ANCHOR_END: sample

#[tokio::main]
async fn main() -> troupe::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let (readings, apart) = if quick {
        (2, Duration::from_millis(100))
    } else {
        (3, Duration::from_millis(500))
    };

    // ANCHOR: open
    let probe = match NvmlProbe::new() {
        Ok(probe) => probe,
        Err(e) => {
            println!("no NVIDIA driver found (NVML: {e}): Troupe would run on simulated GPUs here");
            return Ok(());
        }
    };
    let devices = match probe.devices() {
        Ok(devices) if !devices.is_empty() => devices,
        Ok(_) => {
            println!("NVML answers but reports no GPU: Troupe would run on simulated GPUs here");
            return Ok(());
        }
        Err(e) => {
            println!(
                "NVML loaded, but listing the GPUs failed ({e}): Troupe would run on simulated GPUs here"
            );
            return Ok(());
        }
    };
    // ANCHOR_END: open
    println!("NVML found {} GPU(s):", devices.len());
    for d in &devices {
        println!("  GPU {}: {}", d.index, d.name);
        println!("    uuid   {}", d.uuid);
        println!(
            "    memory {} ({} bytes)",
            gib(d.memory_total),
            d.memory_total
        );
    }

    for n in 1..=readings {
        println!("reading {n} of {readings}:");
        for d in &devices {
            print_sample(d.index, probe.sample(d.index));
        }
        if n < readings {
            tokio::time::sleep(apart).await;
        }
    }

    // ANCHOR: supervisor
    // The same devices as the GPU supervisor sees them: its device actors
    // poll the probe, and a device that answers is healthy and leasable.
    let gpu = GpuSupervisorHandle::spawn(
        GpuArgs {
            probe: Arc::new(probe),
            journal: Arc::new(InMemoryJournal::new()),
            config: GpuConfig {
                poll_interval: apart,
                ..GpuConfig::default()
            },
        },
        None,
    )
    .await?;
    tokio::time::sleep(apart * 2).await;
    println!("as the GPU supervisor sees them:");
    for s in gpu.status().await? {
        println!(
            "  GPU {}: {}, leasable {} and {}% compute, last utilization {}",
            s.device.index,
            if s.device.healthy {
                "healthy"
            } else {
                "UNHEALTHY"
            },
            gib(s.device.memory),
            s.device.compute,
            s.utilization_pct
                .map_or("unread".to_owned(), |u| format!("{u}%")),
        );
    }
    gpu.stop().await;
    // ANCHOR_END: supervisor
    Ok(())
}
