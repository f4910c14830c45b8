//! Test and benchmark programs. Never loaded by the daemon.
//!
//! `natt_inject` (tc ingress on the receiver's veth) emulates what `esp_input_done2` does to a
//! decapsulated NAT-T segment on a kernel without ESP: `bpf_csum_level(BPF_CSUM_LEVEL_INC)`
//! turns a `CHECKSUM_NONE` skb into `CHECKSUM_UNNECESSARY`, so TCP/UDP skip their own check.
//! It can also flip one payload byte of every Nth TCP data segment *without* fixing the
//! checksum — the "corrupted after the integrity check" fault — and counts exactly what it did.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Host builds exist only so `cargo build --workspace` works; see monitor/build.rs.
}

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        EbpfContext as _, Global,
        bindings::{__sk_buff, BPF_CSUM_LEVEL_INC, TC_ACT_OK},
        helpers::generated::bpf_csum_level,
        macros::{classifier, map},
        maps::PerCpuArray,
        programs::TcContext,
    };
    use monitor_ebpf::{IPPROTO_TCP, IPPROTO_UDP};

    /// Corrupt every Nth TCP data segment (per CPU); 0 disables corruption.
    #[unsafe(no_mangle)]
    static CORRUPT_EVERY: Global<u32> = Global::new(0);
    /// Non-zero: mark TCP/UDP segments `CHECKSUM_UNNECESSARY`, as esp4.c does for NAT-T.
    #[unsafe(no_mangle)]
    static MARK_UNNECESSARY: Global<u32> = Global::new(1);

    /// Slots of `INJECT_STATS`; userspace sums them over CPUs (max for `MAX_L4_LEN`).
    pub const MARKED: u32 = 0;
    pub const DATA_SEGMENTS: u32 = 1;
    pub const CORRUPTED: u32 = 2;
    pub const MAX_L4_LEN: u32 = 3;

    #[map]
    static INJECT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(4, 0);

    const ETH_HLEN: usize = 14;

    #[classifier]
    #[expect(
        clippy::needless_pass_by_value,
        reason = "signature fixed by aya's #[classifier]"
    )]
    pub fn natt_inject(ctx: TcContext) -> i32 {
        let _ = try_inject(&ctx);
        TC_ACT_OK
    }

    fn slot(i: u32) -> Option<*mut u64> {
        INJECT_STATS.get_ptr_mut(i)
    }

    fn try_inject(ctx: &TcContext) -> Result<(), i64> {
        let eth_proto: u16 = u16::from_be(ctx.load(12)?);
        let (proto, l4_off, l4_len) = match eth_proto {
            0x0800 => {
                let ip: [u8; 20] = ctx.load(ETH_HLEN)?;
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
                (ip[9], ETH_HLEN + ihl, tot.saturating_sub(ihl))
            }
            0x86dd => {
                let ip: [u8; 40] = ctx.load(ETH_HLEN)?;
                (
                    ip[6],
                    ETH_HLEN + 40,
                    usize::from(u16::from_be_bytes([ip[4], ip[5]])),
                )
            }
            _ => return Ok(()),
        };
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return Ok(());
        }
        if let Some(m) = slot(MAX_L4_LEN) {
            // SAFETY: per-CPU slot.
            unsafe {
                if (l4_len as u64) > *m {
                    *m = l4_len as u64;
                }
            }
        }
        if proto == IPPROTO_TCP {
            let doff_byte: u8 = ctx.load(l4_off + 12)?;
            let doff = usize::from(doff_byte >> 4) * 4;
            let payload = l4_len.saturating_sub(doff);
            if payload > 0 {
                let every = u64::from(CORRUPT_EVERY.load());
                let n = slot(DATA_SEGMENTS).map_or(0, |p| {
                    // SAFETY: per-CPU slot.
                    unsafe {
                        *p += 1;
                        *p
                    }
                });
                if every != 0 && n.is_multiple_of(every) {
                    let at = l4_off + doff + payload / 2;
                    let b: u8 = ctx.load(at)?;
                    // Flags 0: do not touch skb->csum or the L4 checksum. That is the fault.
                    ctx.store(at, &(b ^ 0x5a), 0)?;
                    if let Some(p) = slot(CORRUPTED) {
                        // SAFETY: per-CPU slot.
                        unsafe { *p += 1 };
                    }
                }
            }
        }
        if MARK_UNNECESSARY.load() != 0 {
            // SAFETY: ctx is the program's valid skb.
            let r = unsafe {
                bpf_csum_level(
                    ctx.as_ptr().cast::<__sk_buff>(),
                    u64::from(BPF_CSUM_LEVEL_INC),
                )
            };
            if r == 0
                && let Some(p) = slot(MARKED)
            {
                // SAFETY: per-CPU slot.
                unsafe { *p += 1 };
            }
        }
        Ok(())
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}
