//! Reading GPUs: the [`GpuProbe`] trait, NVML and simulated implementations.
//!
//! | probe | when |
//! |---|---|
//! | [`NvmlProbe`] | an NVIDIA driver is present; `libnvidia-ml.so` is loaded at run time, so the same binary runs without one |
//! | [`SimulatedProbe`] | no driver (development, CI, examples), or tests that script utilization and faults |
//!
//! [`detect`] tries NVML and falls back to simulated devices, saying so once
//! in the log.

use std::sync::{Arc, Mutex};

use crate::error::GpuError;

/// A device's identity and capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Index (0-based).
    pub index: u32,
    /// Product name.
    pub name: String,
    /// Stable id.
    pub uuid: String,
    /// Memory, in bytes.
    pub memory_total: u64,
}

/// One reading of a device. A field the device refused to report (a MIG
/// instance refuses utilization, many boards refuse power) is `None`, and
/// [`DeviceSample::refused`] says which and why: the device stays usable.
/// Only a device that cannot be reached at all fails its reading.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceSample {
    /// Percent of the last sample period a kernel was running.
    pub utilization_pct: Option<u32>,
    /// Memory in use, bytes.
    pub memory_used: Option<u64>,
    /// Memory installed, bytes.
    pub memory_total: u64,
    /// Die temperature, °C, where the device reports it.
    pub temperature_c: Option<u32>,
    /// Power draw, milliwatts, where the device reports it.
    pub power_mw: Option<u32>,
    /// Fields the device refused this time, with the driver's reason
    /// (`"utilization"`, `"memory"`, `"temperature"`, `"power"`).
    pub refused: Vec<(&'static str, String)>,
}

impl DeviceSample {
    /// Keeps `value` if the device gave it, or records why not.
    pub fn field<T, E: std::fmt::Display>(
        &mut self,
        name: &'static str,
        value: Result<T, E>,
    ) -> Option<T> {
        match value {
            Ok(v) => Some(v),
            Err(e) => {
                self.refused.push((name, e.to_string()));
                None
            }
        }
    }
}

/// Something that can list and read GPUs.
pub trait GpuProbe: Send + Sync + 'static {
    /// A short name for logs ("nvml", "simulated").
    fn kind(&self) -> &'static str;
    /// Every device.
    fn devices(&self) -> Result<Vec<DeviceInfo>, GpuError>;
    /// A reading of one device; an error means the device is unhealthy.
    fn sample(&self, index: u32) -> Result<DeviceSample, GpuError>;
}

/// The NVIDIA Management Library, loaded at run time.
pub struct NvmlProbe {
    nvml: nvml_wrapper::Nvml,
}

fn nvml_err(device: Option<u32>, e: nvml_wrapper::error::NvmlError) -> GpuError {
    GpuError::Probe {
        device,
        message: e.to_string(),
    }
}

impl NvmlProbe {
    /// Loads and initialises NVML; fails on machines without the driver.
    pub fn new() -> Result<Self, GpuError> {
        nvml_wrapper::Nvml::init()
            .map(|nvml| Self { nvml })
            .map_err(|e| nvml_err(None, e))
    }
}

impl GpuProbe for NvmlProbe {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn devices(&self) -> Result<Vec<DeviceInfo>, GpuError> {
        let count = self.nvml.device_count().map_err(|e| nvml_err(None, e))?;
        (0..count)
            .map(|i| {
                let d = self
                    .nvml
                    .device_by_index(i)
                    .map_err(|e| nvml_err(Some(i), e))?;
                Ok(DeviceInfo {
                    index: i,
                    name: d.name().map_err(|e| nvml_err(Some(i), e))?,
                    uuid: d.uuid().map_err(|e| nvml_err(Some(i), e))?,
                    memory_total: d.memory_info().map_err(|e| nvml_err(Some(i), e))?.total,
                })
            })
            .collect()
    }

    fn sample(&self, index: u32) -> Result<DeviceSample, GpuError> {
        let d = self
            .nvml
            .device_by_index(index)
            .map_err(|e| nvml_err(Some(index), e))?;
        // Each field on its own: one refused field (MIG instances refuse
        // utilization) leaves the others and the device usable.
        let mut s = DeviceSample::default();
        let mem = s.field("memory", d.memory_info());
        s.memory_used = mem.as_ref().map(|m| m.used);
        s.memory_total = mem.map_or(0, |m| m.total);
        s.utilization_pct = s.field("utilization", d.utilization_rates()).map(|u| u.gpu);
        s.temperature_c = s.field(
            "temperature",
            d.temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu),
        );
        s.power_mw = s.field("power", d.power_usage());
        Ok(s)
    }
}

/// A scripted device of a [`SimulatedProbe`].
#[derive(Debug, Clone)]
pub struct SimulatedDevice {
    /// Identity and memory.
    pub info: DeviceInfo,
    /// Current reading.
    pub sample: DeviceSample,
    /// When set, readings fail with this message (a lost or broken device).
    pub fault: Option<String>,
    /// Fields this device refuses to report, with the reason given.
    pub refuses: Vec<(&'static str, String)>,
}

/// Simulated GPUs with scripted utilization and faults.
#[derive(Clone)]
pub struct SimulatedProbe {
    devices: Arc<Mutex<Vec<SimulatedDevice>>>,
}

impl SimulatedProbe {
    /// `count` identical devices of `memory` bytes each.
    pub fn new(count: u32, memory: u64) -> Self {
        let devices = (0..count)
            .map(|i| SimulatedDevice {
                info: DeviceInfo {
                    index: i,
                    name: "Troupe Simulated GPU".into(),
                    uuid: format!("SIM-{i:04}"),
                    memory_total: memory,
                },
                sample: DeviceSample {
                    memory_total: memory,
                    utilization_pct: Some(0),
                    memory_used: Some(0),
                    temperature_c: Some(40),
                    power_mw: Some(50_000),
                    ..DeviceSample::default()
                },
                fault: None,
                refuses: Vec::new(),
            })
            .collect();
        Self {
            devices: Arc::new(Mutex::new(devices)),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Vec<SimulatedDevice>) -> T) -> T {
        f(&mut self.devices.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Scripts a device's utilization and memory in use.
    pub fn set_load(&self, index: u32, utilization_pct: u32, memory_used: u64) {
        self.with(|d| {
            if let Some(d) = d.get_mut(index as usize) {
                d.sample.utilization_pct = Some(utilization_pct.min(100));
                d.sample.memory_used = Some(memory_used.min(d.info.memory_total));
            }
        });
    }

    /// Makes a device refuse one field of its readings (`Some(reason)`),
    /// as NVML does for utilization on a MIG instance, or report it again
    /// (`None`). `field` is one of those of [`DeviceSample::refused`].
    pub fn refuse(&self, index: u32, field: &'static str, reason: Option<&str>) {
        self.with(|d| {
            if let Some(d) = d.get_mut(index as usize) {
                d.refuses.retain(|(f, _)| *f != field);
                if let Some(r) = reason {
                    d.refuses.push((field, r.to_owned()));
                }
            }
        });
    }

    /// Makes a device fail its readings (`Some`) or heals it (`None`).
    pub fn set_fault(&self, index: u32, fault: Option<&str>) {
        self.with(|d| {
            if let Some(d) = d.get_mut(index as usize) {
                d.fault = fault.map(str::to_owned);
            }
        });
    }
}

impl GpuProbe for SimulatedProbe {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn devices(&self) -> Result<Vec<DeviceInfo>, GpuError> {
        Ok(self.with(|d| d.iter().map(|d| d.info.clone()).collect()))
    }

    fn sample(&self, index: u32) -> Result<DeviceSample, GpuError> {
        self.with(|d| match d.get(index as usize) {
            None => Err(GpuError::Probe {
                device: Some(index),
                message: "no such device".into(),
            }),
            Some(SimulatedDevice { fault: Some(f), .. }) => Err(GpuError::Probe {
                device: Some(index),
                message: f.clone(),
            }),
            Some(d) => {
                let mut s = d.sample.clone();
                for (field, why) in &d.refuses {
                    match *field {
                        "utilization" => s.utilization_pct = None,
                        "memory" => s.memory_used = None,
                        "temperature" => s.temperature_c = None,
                        "power" => s.power_mw = None,
                        _ => {}
                    }
                    s.refused.push((field, why.clone()));
                }
                Ok(s)
            }
        })
    }
}

/// NVML when a driver answers with at least one device, otherwise
/// `fallback` (logged once).
pub fn detect(fallback: SimulatedProbe) -> Arc<dyn GpuProbe> {
    match NvmlProbe::new().and_then(|p| p.devices().map(|d| (p, d.len()))) {
        Ok((probe, n)) if n > 0 => {
            tracing::info!(devices = n, "NVML found {n} GPU(s)");
            Arc::new(probe)
        }
        Ok(_) => {
            tracing::info!("NVML reports no GPU; using simulated devices");
            Arc::new(fallback)
        }
        Err(e) => {
            tracing::info!(reason = %e, "no NVIDIA driver; using simulated devices");
            Arc::new(fallback)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_detection_falls_back_to_the_simulated_devices() {
        // This machine has no NVIDIA driver (CI never does); where one is
        // present the NVML path is exercised by the device check instead.
        if NvmlProbe::new().is_ok() {
            return;
        }
        let probe = detect(SimulatedProbe::new(4, 16 << 30));
        assert_eq!(probe.kind(), "simulated");
        assert_eq!(probe.devices().expect("devices").len(), 4);
    }

    #[test]
    fn scripted_faults_and_loads_show_in_samples() {
        let p = SimulatedProbe::new(2, 1000);
        p.set_load(1, 150, 5000);
        let s = p.sample(1).expect("sample");
        assert_eq!((s.utilization_pct, s.memory_used), (Some(100), Some(1000)));
        p.refuse(1, "utilization", Some("Not Supported (MIG)"));
        let s = p.sample(1).expect("a refused field is not a failed device");
        assert_eq!((s.utilization_pct, s.memory_used), (None, Some(1000)));
        assert_eq!(
            s.refused,
            vec![("utilization", "Not Supported (MIG)".to_owned())]
        );
        p.refuse(1, "utilization", None);
        assert_eq!(p.sample(1).expect("sample").utilization_pct, Some(100));
        p.set_fault(0, Some("fell off the bus"));
        assert!(matches!(
            p.sample(0),
            Err(GpuError::Probe {
                device: Some(0),
                ..
            })
        ));
        p.set_fault(0, None);
        assert!(p.sample(0).is_ok());
        assert!(p.sample(7).is_err());
    }
}
