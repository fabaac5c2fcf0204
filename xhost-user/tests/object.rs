//! Checks on the compiled datapath object itself.

use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

/// The packet programs call no BPF-to-BPF `memset`/`memcpy`/`memmove` subprogram.
///
/// rustc's BPF target turns zeroing and copying of helper argument structs into
/// calls to compiler_builtins' versions, which run as separate (slow, byte-wise)
/// subprograms on every packet: `mem::zeroed()` of `bpf_fib_lookup` alone showed
/// up at about 1 % of a CPU in `perf` at 400 kpps.
#[test]
fn programs_call_no_mem_subprograms() {
    let obj = object::File::parse(xhost_user::datapath::object()).expect("parse eBPF object");
    let mut sections = 0;
    let mut calls = Vec::new();
    for section in obj.sections() {
        let name = section.name().unwrap_or_default();
        if !(name.starts_with("classifier") || name.starts_with("xdp")) {
            continue;
        }
        sections += 1;
        for (offset, reloc) in section.relocations() {
            let RelocationTarget::Symbol(idx) = reloc.target() else {
                continue;
            };
            let sym = obj.symbol_by_index(idx).expect("relocation symbol");
            let target = sym.name().unwrap_or_default();
            if matches!(target, "memset" | "memcpy" | "memmove" | "memcmp" | "bcmp") {
                calls.push(format!("{name}+{offset:#x} -> {target}"));
            }
        }
    }
    assert!(sections >= 2, "found only {sections} program sections");
    let names: Vec<_> = obj
        .symbols()
        .filter_map(|s| s.name().ok())
        .filter(|n| n.starts_with("xhost_"))
        .collect();
    for prog in [
        xhost_common::PROG_BRIDGE_IN,
        xhost_common::PROG_VETH_IN,
        xhost_common::PROG_NIC_IN,
        xhost_common::PROG_NIC_XDP,
    ] {
        assert!(names.contains(&prog), "{prog} not in the object: {names:?}");
    }
    assert!(calls.is_empty(), "calls into mem* subprograms: {calls:#?}");
}

/// Helper ids (`call imm` with src_reg 0) in the code of the sections whose
/// names start with one of `prefixes`.
fn helper_calls(prefixes: &[&str]) -> std::collections::BTreeSet<u32> {
    let obj = object::File::parse(xhost_user::datapath::object()).expect("parse eBPF object");
    let mut ids = std::collections::BTreeSet::new();
    for section in obj.sections() {
        let name = section.name().unwrap_or_default();
        if !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let code = section.data().expect("section data");
        for insn in code.chunks_exact(8) {
            // BPF_JMP | BPF_CALL, src_reg 0: a helper (1 would be a subprogram).
            if insn[0] == 0x85 && insn[1] >> 4 == 0 {
                ids.insert(u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]));
            }
        }
    }
    ids
}

/// The kernel probe at load asks for exactly the helpers the programs call:
/// a helper added to the datapath without being added to the probe would
/// let an older kernel fail in the verifier instead of with one line.
#[test]
fn the_load_probe_checks_every_helper_the_programs_call() {
    use xhost_user::attach::{TC_HELPERS, XDP_HELPERS, helper_name};
    let ids = |list: &[xhost_user::attach::Helper]| -> std::collections::BTreeSet<u32> {
        list.iter().map(|(h, _, _)| *h as u32).collect()
    };
    let probed: std::collections::BTreeSet<u32> =
        ids(TC_HELPERS).union(&ids(XDP_HELPERS)).copied().collect();
    let called = helper_calls(&["classifier", "xdp", ".text"]);
    assert!(called.len() >= 10, "found only {called:?}");
    assert_eq!(
        called,
        probed,
        "helpers called vs probed ({:?})",
        TC_HELPERS
            .iter()
            .chain(XDP_HELPERS)
            .map(|(h, _, _)| helper_name(*h))
            .collect::<Vec<_>>()
    );
    let xdp = helper_calls(&["xdp"]);
    assert!(
        xdp.is_subset(&ids(XDP_HELPERS)),
        "the XDP program calls {xdp:?}, probed for XDP: {:?}",
        ids(XDP_HELPERS)
    );
}
