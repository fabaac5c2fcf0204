//! How the programs reach the kernel's hooks on this kernel: what it
//! offers (probed at load, as `bpftool feature probe` does: program types,
//! the helpers the programs call, tcx), the TC attach method chosen from
//! that (tcx where present, else classic tc: a clsact qdisc and a cls_bpf
//! filter in direct-action mode), and how xhost's classic tc filters are
//! told apart from everybody else's.
//!
//! A classic filter of xhost's has priority [`TC_PRIORITY`], the handle of
//! its hook ([`tc_handle`]) and the program's name (aya names the filter
//! after the program), and the program it runs is the one pinned at
//! `<pin-dir>/filters/<iface>@<hook>`: unload, a restart after a crash and
//! `status` go by those, and leave every other filter alone.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::{
    programs::{
        ProgramError, ProgramInfo, ProgramType, SchedClassifier, TcAttachType,
        tc::{SchedClassifierLink, TcHandle},
    },
    sys::{BpfHelper, is_helper_supported, is_program_supported},
};
use log::warn;
use serde::{Deserialize, Serialize};

use crate::{
    layout::Hook,
    netlink::{Rtnl, TC_PARENT_EGRESS, TC_PARENT_INGRESS, TcFilter},
};

/// Priority of xhost's classic tc filters: "xh" in ASCII. Below the 49152
/// the kernel gives the first filter added without one, so xhost sees a
/// packet before such filters do, as it does with tcx (tcx programs run
/// before every classic filter); what xhost leaves to the kernel
/// (`TC_ACT_UNSPEC`) goes on to them.
pub const TC_PRIORITY: u16 = 0x7868;

/// The handle of xhost's filter at `hook`: one per hook, so two xhost
/// programs on one device (never the case today) would not collide.
pub const fn tc_handle(hook: Hook) -> u32 {
    match hook {
        Hook::Xdp => 0,
        Hook::UnderlayIngress => 1,
        Hook::BridgeIngress => 2,
        Hook::ContainerIngress => 3,
        Hook::TunnelIngress => 4,
        Hook::TunnelEgress => 5,
    }
}

/// Which TC hook a TC attachment point is.
pub const fn tc_attach_type(hook: Hook) -> TcAttachType {
    match hook {
        Hook::TunnelEgress => TcAttachType::Egress,
        _ => TcAttachType::Ingress,
    }
}

/// The clsact parent of classic filters at `at`.
pub const fn tc_parent(at: TcAttachType) -> u32 {
    match at {
        TcAttachType::Egress => TC_PARENT_EGRESS,
        _ => TC_PARENT_INGRESS,
    }
}

/// `--attach`: how TC programs are attached.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum AttachArg {
    /// tcx where the kernel has it (6.6+), else classic tc.
    #[default]
    Auto,
    /// Classic tc: a clsact qdisc and cls_bpf filters in direct-action mode.
    Tc,
    /// tcx links (kernel 6.6+), pinned under <pin-dir>/links.
    Tcx,
}

/// The TC attach method in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TcMethod {
    Tcx,
    Tc,
}

impl TcMethod {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Tc => "tc",
        }
    }
}

/// A helper the programs call: the kernel that brought it, and, for one
/// the programs can do without, what they do instead (the loader tells
/// them through a constant of the object).
pub type Helper = (BpfHelper, &'static str, Option<Fallback>);

/// How the programs do without a helper.
#[derive(Clone, Copy, Debug)]
pub struct Fallback {
    /// The helper's bit in the object's `HELPERS` constant
    /// (`xhost_common::GLOBAL_HELPERS`).
    pub bit: u32,
    /// What differs without it.
    pub instead: &'static str,
}

/// Helpers the TC programs call (`tests/object.rs` checks this against
/// the object), with the kernel that brought each.
pub const TC_HELPERS: &[Helper] = &[
    (BpfHelper::BPF_FUNC_map_lookup_elem, "3.19", None),
    (BpfHelper::BPF_FUNC_get_prandom_u32, "4.1", None),
    (BpfHelper::BPF_FUNC_ktime_get_ns, "4.1", None),
    (BpfHelper::BPF_FUNC_skb_store_bytes, "4.1", None),
    (BpfHelper::BPF_FUNC_redirect, "4.4", None),
    (BpfHelper::BPF_FUNC_skb_load_bytes, "4.5", None),
    (BpfHelper::BPF_FUNC_skb_get_tunnel_key, "4.3", None),
    (BpfHelper::BPF_FUNC_skb_set_tunnel_key, "4.3", None),
    (BpfHelper::BPF_FUNC_skb_change_type, "4.8", None),
    (BpfHelper::BPF_FUNC_get_hash_recalc, "4.8", None),
    (BpfHelper::BPF_FUNC_skb_change_tail, "4.9", None),
    (BpfHelper::BPF_FUNC_skb_adjust_room, "4.13", None),
    (BpfHelper::BPF_FUNC_fib_lookup, "4.18", None),
    (BpfHelper::BPF_FUNC_ringbuf_reserve, "5.8", None),
    (BpfHelper::BPF_FUNC_ringbuf_submit, "5.8", None),
    (BpfHelper::BPF_FUNC_ringbuf_discard, "5.8", None),
    (BpfHelper::BPF_FUNC_redirect_neigh, "5.10", None),
    (BpfHelper::BPF_FUNC_redirect_peer, "5.10", None),
    (
        BpfHelper::BPF_FUNC_ktime_get_coarse_ns,
        "5.11",
        Some(Fallback {
            bit: xhost_common::HELPER_KTIME_COARSE,
            instead: "the flow cache's clock is bpf_ktime_get_ns (a little dearer per cached packet)",
        }),
    ),
    (
        BpfHelper::BPF_FUNC_check_mtu,
        "5.12",
        Some(Fallback {
            bit: xhost_common::HELPER_CHECK_MTU,
            instead: "GSO bursts whose segments must be checked one by one (UDP GSO, VXLAN-encapsulated TCP) are left to the kernel",
        }),
    ),
];

/// Helpers the XDP program calls.
pub const XDP_HELPERS: &[Helper] = &[
    (BpfHelper::BPF_FUNC_map_lookup_elem, "3.19", None),
    (BpfHelper::BPF_FUNC_ringbuf_reserve, "5.8", None),
    (BpfHelper::BPF_FUNC_ringbuf_submit, "5.8", None),
    (BpfHelper::BPF_FUNC_ringbuf_discard, "5.8", None),
];

/// `bpf_redirect_peer` for `BPF_FUNC_redirect_peer`.
pub fn helper_name(h: BpfHelper) -> String {
    format!("{h:?}").replacen("BPF_FUNC_", "bpf_", 1)
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("probing the kernel for {what}")]
    Probe {
        what: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("kernel {kernel} cannot run the datapath: {missing} (xhost needs Linux 5.10 or newer)")]
    Unsupported { kernel: String, missing: String },
    #[error(
        "--attach tcx: kernel {kernel} has no tcx (Linux 6.6 or newer); use --attach tc or auto"
    )]
    NoTcx { kernel: String },
}

/// What the kernel offers the datapath, probed at load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFeatures {
    /// `uname -r`.
    pub release: String,
    /// tcx links (6.6+): BPF_PROG_QUERY knows `BPF_TCX_INGRESS`.
    pub tcx: bool,
    /// Every helper the programs call, by name: whether the kernel has it
    /// for the program's type.
    pub helpers: Vec<(String, bool)>,
    /// `bpf_fib_lookup` takes `BPF_FIB_LOOKUP_SRC` (6.7).
    #[serde(default)]
    pub fib_lookup_src: bool,
    /// Helpers the kernel lacks that the programs do without, and what
    /// differs for it.
    #[serde(default)]
    pub fallbacks: Vec<String>,
}

impl KernelFeatures {
    /// Probes the running kernel. Fails with one line naming what is
    /// missing if the programs cannot load on it.
    pub fn probe() -> Result<Self, ProbeError> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| r.trim().to_owned())
            .unwrap_or_else(|_| "?".into());
        let mut missing = Vec::new();
        for (ty, name) in [
            (ProgramType::SchedClassifier, "tc (sched_cls) programs"),
            (ProgramType::Xdp, "XDP programs"),
        ] {
            if !is_program_supported(ty).map_err(|e| probe_err(name, e))? {
                missing.push(name.to_owned());
            }
        }
        let mut helpers = Vec::new();
        let mut fallbacks = Vec::new();
        if missing.is_empty() {
            for (ty, list, kind) in [
                (ProgramType::SchedClassifier, TC_HELPERS, "tc"),
                (ProgramType::Xdp, XDP_HELPERS, "xdp"),
            ] {
                for &(h, since, fallback) in list {
                    let name = helper_name(h);
                    let ok = is_helper_supported(ty, h).map_err(|e| probe_err(&name, e))?;
                    match (ok, fallback) {
                        (true, _) => {}
                        (false, Some(f)) => {
                            fallbacks.push(format!("no {name} (Linux {since}): {}", f.instead));
                        }
                        (false, None) => {
                            missing.push(format!("no {name} for {kind} programs (Linux {since})"));
                        }
                    }
                    if !helpers.iter().any(|(n, _)| *n == name) {
                        helpers.push((name, ok));
                    }
                }
            }
        }
        if !missing.is_empty() {
            return Err(ProbeError::Unsupported {
                kernel: release,
                missing: missing.join(", "),
            });
        }
        let fib_lookup_src = probe_fib_lookup_src();
        if !fib_lookup_src {
            fallbacks.push(format!("no {FIB_LOOKUP_SRC_FALLBACK}"));
        }
        Ok(Self {
            tcx: probe_tcx()?,
            release,
            helpers,
            fib_lookup_src,
            fallbacks,
        })
    }

    /// Whether the kernel has helper `h` (for the programs that call it).
    pub fn has(&self, h: BpfHelper) -> bool {
        let name = helper_name(h);
        self.helpers.iter().any(|(n, ok)| *n == name && *ok)
    }

    /// The object's `HELPERS` constant: the bits of the helpers the
    /// programs can do without that this kernel has.
    pub fn helper_bits(&self) -> u32 {
        let flags = if self.fib_lookup_src {
            xhost_common::HELPER_FIB_LOOKUP_SRC
        } else {
            0
        };
        TC_HELPERS
            .iter()
            .filter_map(|&(h, _, f)| f.filter(|_| self.has(h)).map(|f| f.bit))
            .fold(flags, |bits, bit| bits | bit)
    }

    /// The method `arg` asks for, if this kernel has it.
    pub fn choose(&self, arg: AttachArg) -> Result<TcMethod, ProbeError> {
        match (arg, self.tcx) {
            (AttachArg::Tcx, false) => Err(ProbeError::NoTcx {
                kernel: self.release.clone(),
            }),
            (AttachArg::Tcx, true) | (AttachArg::Auto, true) => Ok(TcMethod::Tcx),
            (AttachArg::Tc, _) | (AttachArg::Auto, false) => Ok(TcMethod::Tc),
        }
    }
}

fn probe_err(what: &str, e: ProgramError) -> ProbeError {
    ProbeError::Probe {
        what: what.to_owned(),
        source: Box::new(e),
    }
}

/// tcx: a kernel without it refuses `BPF_PROG_QUERY` for `BPF_TCX_INGRESS`
/// with EINVAL; one with it answers (for the loopback device, which every
/// namespace has). Nothing is attached.
fn probe_tcx() -> Result<bool, ProbeError> {
    match SchedClassifier::query_tcx("lo", TcAttachType::Ingress) {
        Ok(_) => Ok(true),
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => {
            Ok(false)
        }
        Err(e) => Err(probe_err("tcx", e)),
    }
}

/// What VXLAN mode does without `BPF_FIB_LOOKUP_SRC`.
const FIB_LOOKUP_SRC_FALLBACK: &str = "BPF_FIB_LOOKUP_SRC for bpf_fib_lookup (Linux 6.7): \
    in VXLAN mode the vxlan device encapsulates every packet the programs forward \
    (they are redirected to it) instead of the programs";

/// Whether `bpf_fib_lookup` takes `BPF_FIB_LOOKUP_SRC`. A flag is not a
/// helper, so `is_helper_supported` cannot tell: this loads a tc program
/// that calls `bpf_fib_lookup(skb, &zeroed, 64, BPF_FIB_LOOKUP_SRC)` and runs
/// it once with `BPF_PROG_TEST_RUN`. The kernel checks the flags before the
/// address family: one that does not know the flag answers `-EINVAL`, one
/// that does goes on to refuse family 0 with `-EAFNOSUPPORT`. aya has no
/// API for a program built from raw instructions, hence the two syscalls.
/// Anything else going wrong reads as "absent", the safe side.
fn probe_fib_lookup_src() -> bool {
    // struct bpf_insn: code, dst_reg:4 | src_reg:4, off, imm.
    const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        (code as u64)
            | (((dst | (src << 4)) as u64) << 8)
            | ((off as u16 as u64) << 16)
            | ((imm as u32 as u64) << 32)
    }
    const MOV64_REG: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    const MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const ADD64_IMM: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
    const ST_DW: u8 = 0x7a; // BPF_ST | BPF_MEM | BPF_DW
    const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    const FIB_PARAMS: i32 = 64; // sizeof(struct bpf_fib_lookup)
    const BPF_FIB_LOOKUP_SRC: i32 = 1 << 4;
    const BPF_PROG_TYPE_SCHED_CLS: u64 = 3;
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let mut prog = vec![insn(MOV64_REG, 6, 1, 0, 0)];
    // The verifier wants the params initialised: 8 zero doublewords.
    prog.extend((1..=8).map(|k| insn(ST_DW, 10, 0, -8 * k, 0)));
    prog.extend([
        insn(MOV64_REG, 2, 10, 0, 0),
        insn(ADD64_IMM, 2, 0, 0, -FIB_PARAMS),
        insn(MOV64_REG, 1, 6, 0, 0),
        insn(MOV64_IMM, 3, 0, 0, FIB_PARAMS),
        insn(MOV64_IMM, 4, 0, 0, BPF_FIB_LOOKUP_SRC),
        insn(CALL, 0, 0, 0, BpfHelper::BPF_FUNC_fib_lookup as i32),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    let license = c"GPL";
    // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns,
    // license; zero past them.
    let mut load = [0u64; 16];
    load[0] = BPF_PROG_TYPE_SCHED_CLS | ((prog.len() as u64) << 32);
    load[1] = prog.as_ptr() as u64;
    load[2] = license.as_ptr() as u64;
    // SAFETY: BPF_PROG_LOAD reads the attr and what it points at, all
    // alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            load.as_ptr(),
            size_of_val(&load),
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: a new descriptor only this function holds.
    let prog_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let packet = [0u8; 64];
    // union bpf_attr for BPF_PROG_TEST_RUN: prog_fd, retval (out),
    // data_size_in, data_size_out, data_in; zero past them.
    let mut run = [0u64; 10];
    run[0] = prog_fd.as_raw_fd() as u64;
    run[1] = packet.len() as u64;
    run[2] = packet.as_ptr() as u64;
    // SAFETY: BPF_PROG_TEST_RUN reads the packet and writes retval into
    // the attr, both alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            run.as_mut_ptr(),
            size_of_val(&run),
        )
    };
    let retval = (run[0] >> 32) as u32 as i32;
    rc == 0 && retval != -libc::EINVAL
}

/// Whether `f` looks like one of xhost's filters (priority and name).
pub fn is_xhost_filter(f: &TcFilter) -> bool {
    f.priority == TC_PRIORITY
        && f.kind == "bpf"
        && f.bpf_name
            .as_deref()
            .is_some_and(|n| n.starts_with("xhost_"))
}

/// xhost's filter at `hook` of `ifindex` that runs program `prog_id`
/// (any xhost program if `None`).
pub fn find_filter(
    rtnl: &mut Rtnl,
    ifindex: u32,
    hook: Hook,
    prog_id: Option<u32>,
) -> io::Result<Option<TcFilter>> {
    let parent = tc_parent(tc_attach_type(hook));
    Ok(rtnl.tc_filters(ifindex, parent)?.into_iter().find(|f| {
        is_xhost_filter(f)
            && f.handle == tc_handle(hook)
            && prog_id.is_none_or(|id| f.bpf_id == Some(id))
    }))
}

/// Deletes xhost's filter at `hook` of `iface` (by its priority and
/// handle, through aya). Gone already (the device too) is fine.
pub fn delete_filter(iface: &str, hook: Hook) -> Result<(), ProgramError> {
    let link = match SchedClassifierLink::attached(
        iface,
        tc_attach_type(hook),
        TC_PRIORITY,
        TcHandle::from(tc_handle(hook)),
        None,
    ) {
        Ok(l) => l,
        Err(_) => return Ok(()), // no such device: its filters went with it
    };
    match aya::programs::links::Link::detach(link) {
        Err(e) if is_gone(&e) => Ok(()),
        r => r,
    }
}

/// Removes the classic tc filter whose program is pinned at
/// `<pin-dir>/filters/<iface>@<hook>`, if it still runs that very program
/// (else it is not this instance's), then the pin.
pub fn remove_filter(path: &Path, iface: &str, hook: Hook) -> io::Result<()> {
    if let Ok(info) = ProgramInfo::from_pin(path) {
        let ifindex = crate::net::ifindex(iface).ok();
        let ours = match (ifindex, Rtnl::open()) {
            (Some(i), Ok(mut rtnl)) => find_filter(&mut rtnl, i, hook, Some(info.id()))?.is_some(),
            _ => false,
        };
        if ours && let Err(e) = delete_filter(iface, hook) {
            warn!("removing xhost's tc filter on {iface}: {e}");
        }
    }
    crate::layout::remove_file_if_exists(path)
}

/// Deletes the clsact qdisc of `iface` that xhost added, if no filter is
/// left under it (one added since by anybody else keeps it).
pub fn remove_clsact_if_unused(iface: &str) -> io::Result<()> {
    let Ok(ifindex) = crate::net::ifindex(iface) else {
        return Ok(()); // the device is gone, and its qdisc with it
    };
    let mut rtnl = Rtnl::open()?;
    if !rtnl.has_clsact(ifindex)? {
        return Ok(());
    }
    let left = rtnl.tc_filters(ifindex, TC_PARENT_INGRESS)?.len()
        + rtnl.tc_filters(ifindex, TC_PARENT_EGRESS)?.len();
    if left > 0 {
        warn!("{iface}: leaving the clsact qdisc xhost added: {left} other filter(s) use it");
        return Ok(());
    }
    match rtnl.delete_clsact(ifindex) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)
            ) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// Whether a netlink failure says the filter (or its device) is gone.
fn is_gone(e: &ProgramError) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return matches!(
                io.raw_os_error(),
                Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)
            );
        }
        src = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(tcx: bool) -> KernelFeatures {
        KernelFeatures {
            release: "x".into(),
            tcx,
            helpers: Vec::new(),
            fib_lookup_src: true,
            fallbacks: Vec::new(),
        }
    }

    #[test]
    fn auto_prefers_tcx_and_a_forced_method_the_kernel_lacks_is_refused() {
        assert_eq!(
            features(true).choose(AttachArg::Auto).ok(),
            Some(TcMethod::Tcx)
        );
        assert_eq!(
            features(false).choose(AttachArg::Auto).ok(),
            Some(TcMethod::Tc)
        );
        assert_eq!(
            features(true).choose(AttachArg::Tc).ok(),
            Some(TcMethod::Tc)
        );
        assert!(matches!(
            features(false).choose(AttachArg::Tcx),
            Err(ProbeError::NoTcx { .. })
        ));
    }

    #[test]
    fn only_xhost_named_bpf_filters_at_its_priority_are_xhosts() {
        let ours = TcFilter {
            priority: TC_PRIORITY,
            handle: 1,
            kind: "bpf".into(),
            bpf_name: Some("xhost_nic_in".into()),
            bpf_id: Some(7),
            direct_action: true,
        };
        assert!(is_xhost_filter(&ours));
        for other in [
            TcFilter {
                priority: 49152,
                ..ours.clone()
            },
            TcFilter {
                bpf_name: Some("cil_from_netdev".into()),
                ..ours.clone()
            },
            TcFilter {
                kind: "u32".into(),
                bpf_name: None,
                ..ours.clone()
            },
        ] {
            assert!(!is_xhost_filter(&other), "{other:?}");
        }
    }

    #[test]
    fn a_missing_optional_helper_clears_its_bit_only() {
        let mut k = features(false);
        k.helpers = TC_HELPERS
            .iter()
            .map(|(h, _, _)| (helper_name(*h), true))
            .collect();
        assert_eq!(k.helper_bits(), xhost_common::HELPERS_ALL);
        for (name, ok) in &mut k.helpers {
            if name == "bpf_check_mtu" {
                *ok = false;
            }
        }
        assert_eq!(
            k.helper_bits(),
            xhost_common::HELPER_KTIME_COARSE | xhost_common::HELPER_FIB_LOOKUP_SRC
        );
        k.fib_lookup_src = false;
        assert_eq!(k.helper_bits(), xhost_common::HELPER_KTIME_COARSE);
    }

    #[test]
    fn helper_names_read_as_in_the_kernel_docs() {
        assert_eq!(
            helper_name(BpfHelper::BPF_FUNC_redirect_peer),
            "bpf_redirect_peer"
        );
    }
}
