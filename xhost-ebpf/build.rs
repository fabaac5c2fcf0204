//! Re-link the eBPF object when bpf-linker changes.
use which::which;

fn main() {
    // bpf-linker is the linker of the BPF target; rebuild when it is replaced.
    if let Ok(path) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
