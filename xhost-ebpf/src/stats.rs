//! Per-CPU packet and byte counters, one slot per verdict reason.

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use xhost_common::{Counter, stat};

/// Packets/bytes per `xhost_common::stat` index, per CPU.
#[btf_map]
pub static STATS: PerCpuArray<Counter, { stat::COUNT as usize }> = PerCpuArray::new();

/// Counts one packet of `len` bytes under `reason`.
#[inline(always)]
pub fn count(reason: u32, len: u32) {
    if let Some(c) = STATS.get_ptr_mut(reason) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently
        // with this program.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
    }
}
