//! Which segments are the verifier's: those whose checksum the kernel skipped.
//!
//! SA scope reads the segment's own IPsec state (its `sec_path`); address scope, for kernels
//! without BTF, leaves out what is certainly plaintext.

use aya_ebpf::{EbpfContext as _, helpers::bpf_probe_read_kernel, programs::SkBuffContext};
use monitor_ebpf::{Counter, PeerValue, XFRM_MAX_DEPTH, XFRM_MODE_TRANSPORT, csum};

use crate::{
    maps::{TUNNEL_COUNT, TUNNELS, secpath},
    parse::{L4, skb},
};

const IKE_PORT: u16 = 500;
const NATT_PORT: u16 = 4500;

/// The SA that decapsulated a segment: the innermost state of its `sec_path`. All zero under
/// address scope.
#[derive(Clone, Copy)]
pub struct Sa {
    /// The `struct xfrm_state`'s address; its SPI and reqid are read only for a report.
    pub state: u64,
    /// Encapsulation source port, network byte order.
    pub sport: u16,
    /// Encapsulation destination port, network byte order.
    pub dport: u16,
}

impl Sa {
    /// Address scope: no SA is known.
    pub const NONE: Self = Self {
        state: 0,
        sport: 0,
        dport: 0,
    };
}

/// Reads `T` from kernel memory at `addr`.
#[inline(always)]
pub fn kread<T>(addr: u64) -> Result<T, Counter> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|_| Counter::SkipIpsecUnreadable)
}

/// The SA that decapsulated this segment, if its checksum is one the kernel skipped: the
/// innermost `xfrm_state` of the skb's `sec_path` is in transport mode with an encapsulation
/// template (ESP in UDP or TCP). `esp_input_done2` (net/ipv4/esp4.c, net/ipv6/esp6.c) marks
/// exactly those `CHECKSUM_UNNECESSARY`. Ordinary traffic costs one read.
#[inline(always)]
pub fn ipsec_state(ctx: &SkBuffContext) -> Result<Sa, Counter> {
    let skb = ctx.as_ptr() as u64;
    let active: u8 = kread(skb + u64::from(secpath!(skb_active_extensions)))?;
    if u32::from(active) & secpath!(sec_path_bit) == 0 {
        return Err(Counter::SkipNotIpsec);
    }
    let ext: u64 = kread(skb + u64::from(secpath!(skb_extensions)))?;
    let off: u8 = kread(ext + u64::from(secpath!(ext_sec_path_offset)))?;
    let sp = ext + (u64::from(off) << 3);
    let len = if secpath!(sp_len_size) == 1 {
        u32::from(kread::<u8>(sp + u64::from(secpath!(sp_len)))?)
    } else {
        kread::<u32>(sp + u64::from(secpath!(sp_len)))?
    };
    if len == 0 || len > XFRM_MAX_DEPTH {
        return Err(Counter::SkipIpsecUnreadable);
    }
    let x: u64 = kread(sp + u64::from(secpath!(sp_xvec)) + u64::from(len - 1) * 8)?;
    let encap: u64 = kread(x + u64::from(secpath!(x_encap)))?;
    let mode: u8 = kread(x + u64::from(secpath!(x_mode)))?;
    if encap == 0 || mode != XFRM_MODE_TRANSPORT {
        return Err(Counter::SkipIpsecCheckedByKernel);
    }
    let ports: [u16; 2] = kread(encap + u64::from(secpath!(encap_sport)))?;
    Ok(Sa {
        state: x,
        sport: ports[0],
        dport: ports[1],
    })
}

/// Why a packet is the verifier's: the SA that decapsulated it (`Sa::NONE` under address
/// scope), or, with `TUNNELS` (the `bpf_loop` variant), the tunnel device it came out of and the
/// peer that tunnel counts under. A tunnel's decapsulation scrubs the `sec_path`
/// (`skb_scrub_packet` in `__iptunnel_pull_header`) but keeps the `CHECKSUM_UNNECESSARY` mark
/// `esp_input_done2` set on the outer packet, so its inner segments skip their check too; the
/// daemon lists only tunnels that an inbound policy requires ESP for (docs/verifier.md).
#[inline(always)]
pub fn in_scope<const TUNNELS_ON: bool>(
    ctx: &SkBuffContext,
) -> Result<(Sa, Option<PeerValue>), Counter> {
    if secpath!(enabled) == 0 {
        return Ok((Sa::NONE, None));
    }
    match ipsec_state(ctx) {
        Err(Counter::SkipNotIpsec) if TUNNELS_ON => Ok((Sa::NONE, Some(tunnel_peer(ctx)?))),
        r => r.map(|sa| (sa, None)),
    }
}

/// The peer of the tunnel device a packet without `sec_path` arrived on (`ingress_ifindex`
/// is the device whose receive path last ran, the tunnel's for its inner packets), or
/// `not_ipsec`. An ifindex is unique only within a network namespace, so a hit is confirmed
/// by the namespace of the skb's device (`skb->dev->nd_net.net->ns.inum`): three reads, paid
/// only by packets whose ifindex is a listed tunnel's.
#[inline(always)]
fn tunnel_peer(ctx: &SkBuffContext) -> Result<PeerValue, Counter> {
    if TUNNEL_COUNT.get(0).copied().unwrap_or(0) == 0 {
        return Err(Counter::SkipNotIpsec);
    }
    // A copy: the kernel takes a map key from the stack, not from the context.
    let ifindex = skb(ctx).ingress_ifindex;
    // SAFETY: a map lookup with a key on the stack.
    let t = unsafe { TUNNELS.get(&ifindex) }
        .copied()
        .ok_or(Counter::SkipNotIpsec)?;
    let dev: u64 = kread(ctx.as_ptr() as u64 + u64::from(secpath!(skb_dev)))?;
    let net: u64 = kread(dev + u64::from(secpath!(dev_net)))?;
    let inum: u32 = kread(net + u64::from(secpath!(net_inum)))?;
    if inum != t.netns {
        return Err(Counter::SkipNotIpsec);
    }
    Ok(t.peer)
}

/// The SA's SPI (network byte order), which names it in `SA_TRUST`; 0 under address scope or
/// where it cannot be read.
#[inline(always)]
pub fn sa_spi(sa: &Sa) -> u32 {
    if sa.state == 0 {
        return 0;
    }
    kread(sa.state + u64::from(secpath!(x_spi))).unwrap_or(0)
}

/// The SA's reqid, for a report; 0 where it cannot be read or no SA is known.
#[inline(always)]
pub fn sa_reqid(sa: &Sa) -> u32 {
    if sa.state == 0 {
        return 0;
    }
    kread(sa.state + u64::from(secpath!(x_reqid))).unwrap_or(0)
}

/// Address scope cannot tell which segments the kernel skipped, so it leaves out the two kinds
/// that are certainly plaintext with an ordinary or partial checksum: IKE's ports (UDP, and TCP
/// for RFC 8229's ESP-in-TCP stream itself, whose segments carry ESP), and the partial-checksum
/// signature.
#[inline(always)]
pub fn address_scope_exemptions(l4: &L4, pseudo: u64) -> Result<(), Counter> {
    if matches!(l4.sport, IKE_PORT | NATT_PORT) || matches!(l4.dport, IKE_PORT | NATT_PORT) {
        return Err(Counter::SkipIke);
    }
    if csum::normalize(l4.field) == csum::partial_field(pseudo) {
        return Err(Counter::SkipPartialChecksum);
    }
    Ok(())
}
