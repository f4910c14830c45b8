//! `natt_probe_bpf_loop`: the feature probe. It loads only where the kernel has `bpf_loop`
//! (5.17+), which is how the loader chooses the verifier's shape. Never attached.

use core::ffi::c_void;

use aya_ebpf::{helpers::generated::bpf_loop, macros::cgroup_skb, programs::SkBuffContext};

/// The probe program.
#[cgroup_skb(ingress)]
#[expect(
    clippy::needless_pass_by_value,
    reason = "signature fixed by aya's #[cgroup_skb]"
)]
pub fn natt_probe_bpf_loop(ctx: SkBuffContext) -> i32 {
    let _ = &ctx;
    // SAFETY: a valid callback and a null context it never reads.
    unsafe { bpf_loop(1, probe_callback as *mut c_void, core::ptr::null_mut(), 0) };
    1
}

#[inline(never)]
extern "C" fn probe_callback(_index: u64, _ctx: *mut c_void) -> i64 {
    1
}
