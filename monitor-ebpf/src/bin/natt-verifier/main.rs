//! The `cgroup_skb` ingress verifier: recomputes the TCP/UDP checksums that the kernel marks
//! `CHECKSUM_UNNECESSARY` without checking after ESP-in-UDP transport-mode decapsulation
//! (`esp_input_done2` in `net/ipv4/esp4.c` and `net/ipv6/esp6.c`, unchanged from 2.6 to 6.x).
//!
//! Where it runs: `tcp_v4_rcv`/`tcp_v6_rcv` → `tcp_filter` → `sk_filter_trim_cap` →
//! `__cgroup_bpf_run_filter_skb` (and the UDP equivalent in `udp_queue_rcv_one_skb`), with the
//! skb pushed back to its network header, so offset 0 is the IP header. The program sees
//! plaintext after xfrm, which tc and XDP cannot. Returning 0 drops the segment; TCP then
//! retransmits it because it was never acknowledged.
//!
//! Scope comes from each segment's own IPsec state: the program reads the skb's `sec_path` (the
//! context pointer *is* the kernel's `struct sk_buff`) at offsets the daemon took from the
//! kernel's BTF, and verifies exactly the segments that a transport-mode SA with UDP/TCP
//! encapsulation decapsulated. Without BTF it falls back to scope by source address (LPM tries
//! filled by userspace) with exemptions for IKE ports and partial checksums.
//!
//! One object, one program in two loop shapes (`verify.rs`: `natt_verify` with `bpf_loop`,
//! `natt_verify_compat` with a bounded loop; the loader probes the kernel for `bpf_loop` and loads
//! one). The rest is shared, one concern per module:
//!
//! | module | what |
//! |---|---|
//! | `maps` | every map and load-time constant |
//! | `stats` | the one place counters and per-peer statistics change |
//! | `scope` | the segment's IPsec state; address-scope exemptions |
//! | `parse` | IPv4, IPv6 and L4 headers |
//! | `sum` | the one's-complement sum of the segment |
//! | `trust` | the residual each SA is verified against: inherited on a rekey, withdrawn on an exact streak |
//! | `hold` | `natt_hold`, tail-called in enforce mode: a TCP segment of an SA without a residual is dropped until TCP's retransmission confirms it |
//! | `sctp` | `natt_sctp`, tail-called for SCTP (the `bpf_loop` variant): its CRC32c |
//! | `report` | mismatch events, learning samples, captured packets |
//! | `pair` | a dropped TCP segment remembered until its intact retransmission is captured |
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        clippy::inline_always,
        reason = "inlining decides BPF subprogram boundaries and with them the 512-byte stack budget"
    )
)]

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Host builds of this binary exist only so `cargo build --workspace` works; the real object
    // is built for bpfel-unknown-none by monitor/build.rs.
}

#[cfg(target_arch = "bpf")]
mod hold;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod pair;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod report;
#[cfg(target_arch = "bpf")]
mod scope;
#[cfg(target_arch = "bpf")]
mod sctp;
#[cfg(target_arch = "bpf")]
mod stats;
#[cfg(target_arch = "bpf")]
mod sum;
#[cfg(target_arch = "bpf")]
mod trust;
#[cfg(target_arch = "bpf")]
mod verify;

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
