//! Device and precision resolution, and what the cost model needs to know about the hardware.

use tch::Device;

use crate::config::{DeviceChoice, Dtype};
use crate::error::TrainError;

/// Resolves `run.device` (`auto|cpu|cuda`) to a libtorch device; `cuda_ordinal` is the local
/// rank's GPU (0 without a launcher).
pub fn resolve_device(choice: DeviceChoice, cuda_ordinal: usize) -> Result<Device, TrainError> {
    let have_cuda = tch::Cuda::is_available();
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda if !have_cuda => Err(TrainError::Device(
            "run.device = cuda but libtorch sees no CUDA device: use run.device=auto or cpu, or check the driver (nvidia-smi)".into(),
        )),
        DeviceChoice::Cuda | DeviceChoice::Auto if have_cuda => {
            let n = tch::Cuda::device_count() as usize;
            if cuda_ordinal >= n {
                return Err(TrainError::Device(format!(
                    "this rank wants GPU {cuda_ordinal} but only {n} are visible: launch at most {n} ranks per node"
                )));
            }
            Ok(Device::Cuda(cuda_ordinal))
        }
        _ => Ok(Device::Cpu),
    }
}

/// Sets how float32 matmuls run on CUDA (`train.tf32`): TF32 tensor cores or IEEE float32.
/// Process-wide in libtorch, so every setup sets it (a process that trains twice gets what each
/// run asked for). Nothing changes on the CPU.
pub fn apply_tf32(tf32: bool) -> Result<(), TrainError> {
    fabbrica_torch_ext::set_cuda_matmul_tf32(tf32).map_err(|e| TrainError::Torch(format!("setting train.tf32 = {tf32}: {e}")))
}

/// How a run's float32 matmuls run, for the start line: `fp32` on the CPU, with the TF32 setting
/// on CUDA; bf16 autocast leaves few float32 matmuls, so it is not mentioned there.
pub fn precision_label(bf16: bool, tf32: bool, device: Device) -> &'static str {
    match (bf16, device) {
        (true, _) => "bf16 autocast",
        (false, Device::Cuda(_)) if tf32 => "fp32, TF32 matmuls",
        (false, Device::Cuda(_)) => "fp32, IEEE matmuls",
        (false, _) => "fp32",
    }
}

/// The device a run configured with `run.device = name` would train on, without asking for one
/// (for `--dry-run` and planning on another machine): `cuda` is CUDA even where none is visible,
/// `auto` is CUDA where libtorch sees a GPU. Training itself uses [`resolve_device`], the same
/// rule plus the checks.
pub fn planned_device(choice: DeviceChoice) -> Device {
    match choice {
        DeviceChoice::Cuda => Device::Cuda(0),
        DeviceChoice::Auto if tch::Cuda::is_available() => Device::Cuda(0),
        _ => Device::Cpu,
    }
}

/// Resolves `train.dtype`: `auto` is bf16 autocast on CUDA and fp32 on the CPU (where bf16
/// matmuls are fast only on CPUs with bf16 instructions); `bf16` is bf16 autocast on either
/// (`fabbrica_torch_ext::amp::autocast`). Returns whether bf16 autocast is on.
pub fn resolve_bf16(dtype: Dtype, device: Device) -> bool {
    matches!((dtype, device), (Dtype::Bf16, _) | (Dtype::Auto, Device::Cuda(_)))
}

/// Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16, from /proc/cpuinfo's flags);
/// without it libtorch emulates bf16 matmuls, many times slower than fp32. True where the flags
/// cannot be read (no note rather than a wrong one).
pub fn cpu_has_bf16() -> bool {
    use std::io::Read;
    let mut text = String::new();
    // Bounded: the flags are on the first processor's lines.
    match std::fs::File::open("/proc/cpuinfo").and_then(|f| f.take(1 << 16).read_to_string(&mut text)) {
        Ok(_) => match text.lines().find(|l| l.starts_with("flags")) {
            Some(flags) => flags.split_whitespace().any(|f| f == "avx512_bf16" || f == "amx_bf16"),
            None => true,
        },
        Err(_) => true,
    }
}

/// The peak FLOP/s MFU is reported against: `train.peak_flops` when set (> 0), else the dense
/// bf16 peak of a known GPU, else none (MFU is then not reported).
pub fn peak_flops(configured: f64, device: Device) -> Option<f64> {
    if configured > 0.0 {
        return Some(configured);
    }
    match device {
        Device::Cuda(i) => gpu_name(i).as_deref().and_then(peak_flops_for),
        _ => None,
    }
}

/// The GPU's marketing name through the CUDA driver API, if a driver is present.
pub fn gpu_name(ordinal: usize) -> Option<String> {
    // SAFETY: is_culib_present only tries to dlopen libcuda and drops the handle.
    if !tch::Cuda::is_available() || !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    use cudarc::driver::result;
    result::init().ok()?;
    let dev = result::device::get(ordinal as i32).ok()?;
    result::device::get_name(dev).ok()
}

/// Dense bf16 tensor-core peak FLOP/s of known GPUs (vendor datasheets, without sparsity).
/// MFU is reported against this; set `train.peak_flops` for anything else, the CPU included.
pub fn peak_flops_for(gpu_name: &str) -> Option<f64> {
    let n = gpu_name.to_ascii_uppercase();
    let table: [(&str, f64); 10] = [
        ("H200", 989e12),
        ("H100 PCIE", 756e12),
        ("H100", 989e12),
        ("GH200", 989e12),
        ("B200", 2250e12),
        ("A100", 312e12),
        ("L40S", 362e12),
        ("L4", 121e12),
        ("A10", 125e12),
        ("4090", 165e12),
    ];
    table.iter().find(|(k, _)| n.contains(k)).map(|&(_, f)| f)
}

/// Peak resident memory of this process on the CPU (VmHWM), or the CUDA caching allocator's peak.
pub fn peak_memory_bytes(device: Device) -> u64 {
    if let Device::Cuda(i) = device {
        if let Some(b) = fabbrica_torch_ext::cuda_peak_allocated_bytes(i) {
            return b;
        }
    }
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<u64>().ok()))
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_table_prefers_the_specific_name() {
        assert_eq!(peak_flops_for("NVIDIA H100 PCIe"), Some(756e12));
        assert_eq!(peak_flops_for("NVIDIA H100 80GB HBM3"), Some(989e12));
        assert_eq!(peak_flops_for("NVIDIA A100-SXM4-80GB"), Some(312e12));
        assert_eq!(peak_flops_for("Some CPU"), None);
    }

    #[test]
    fn cpu_resolution_and_bf16() {
        assert_eq!(resolve_device(DeviceChoice::Cpu, 0).unwrap(), Device::Cpu);
        assert!(!resolve_bf16(Dtype::Auto, Device::Cpu));
        assert!(!resolve_bf16(Dtype::Fp32, Device::Cuda(0)));
        assert!(resolve_bf16(Dtype::Auto, Device::Cuda(0)));
        assert!(resolve_bf16(Dtype::Bf16, Device::Cpu));
        if !tch::Cuda::is_available() {
            assert_eq!(resolve_device(DeviceChoice::Auto, 0).unwrap(), Device::Cpu);
            assert!(resolve_device(DeviceChoice::Cuda, 0).unwrap_err().to_string().contains("run.device"));
        }
        assert!(peak_memory_bytes(Device::Cpu) > 0);
    }
}
