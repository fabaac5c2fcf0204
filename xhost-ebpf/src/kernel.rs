//! What the kernel the object was loaded into has, as the loader probed it.

use core::ptr::read_volatile;

use xhost_common::HELPERS_ALL;

/// `xhost_common::HELPER_*` bits of the helpers the kernel has. Set by the
/// loader (`xhost_common::GLOBAL_HELPERS`); all of them unless it says.
#[unsafe(no_mangle)]
static HELPERS: u32 = HELPERS_ALL;

/// Whether the kernel has the helper of `bit`.
///
/// Verifier: `HELPERS` lives in the frozen read-only `.rodata` map, so the
/// verifier knows its value, walks only the branch it selects, and removes
/// the other as dead code before it resolves helper calls: an older kernel
/// never sees the call to a helper it lacks.
#[inline(always)]
pub fn has(bit: u32) -> bool {
    // SAFETY: a plain load of a load-time constant.
    let helpers = unsafe { read_volatile(&raw const HELPERS) };
    helpers & bit != 0
}
