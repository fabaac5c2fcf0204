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
        xhost_common::PROG_EGRESS,
        xhost_common::PROG_FROM_CTR,
        xhost_common::PROG_INGRESS,
        xhost_common::PROG_XDP,
    ] {
        assert!(names.contains(&prog), "{prog} not in the object: {names:?}");
    }
    assert!(calls.is_empty(), "calls into mem* subprograms: {calls:#?}");
}
