//! Tunnels inside NAT-T transport SAs: GRE, IPIP, SIT and ip6 tunnel devices whose packets a
//! NAT-T transport SA carries.
//!
//! `esp_input_done2` marks the decapsulated packet `CHECKSUM_UNNECESSARY`; a tunnel's receive
//! path scrubs the `sec_path` (`skb_scrub_packet`) but keeps the mark, so the inner TCP, UDP,
//! ICMP and SCTP checks are skipped as well and the verifier sees the inner segment with no
//! IPsec state. The daemon therefore names such devices to the verifier (`TUNNELS`, by
//! ifindex). A device qualifies when its every inner packet came through ESP: it has a fixed
//! remote, an inbound NAT-T transport SA comes from that remote, and the inbound policies that
//! can match its outer packets (that remote, its local address, the tunnel's protocol) require
//! ESP in transport mode, with none of equal or better priority letting plaintext in. The kernel
//! drops a packet that a required template did not decapsulate (`xfrm_policy_check` in
//! `ip_protocol_deliver_rcu` for GRE, in `ipip_rcv` and `ipip6_rcv` for IPIP and SIT), so
//! nothing else arrives on it: its inner segments carry their sender's checksums, the inner
//! addresses are not NAT'd, and residual 0 is exact. Links are read over rtnetlink, parsed by
//! the maintained `netlink-packet-route` crate.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr},
};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{
        InfoData, InfoGre, InfoGre6, InfoIpTunnel, InfoKind, LinkAttribute, LinkInfo, LinkMessage,
    },
};
use netlink_packet_xfrm::{XFRM_POLICY_BLOCK, XFRM_POLICY_IN};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::xfrm::{Policy, Sa};

/// IP protocol numbers a tunnel's outer packets carry.
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_GRE: u8 = 47;

/// A tunnel device's kind, as `ip link` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Gre,
    Ip6Gre,
    Ipip,
    Sit,
    Ip6Tnl,
}

impl Kind {
    /// The name `ip link add ... type` takes.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Gre => "gre",
            Self::Ip6Gre => "ip6gre",
            Self::Ipip => "ipip",
            Self::Sit => "sit",
            Self::Ip6Tnl => "ip6tnl",
        }
    }
}

/// One point-to-point tunnel device.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tunnel {
    pub ifindex: u32,
    /// The inode number of the network namespace it lives in (this process's).
    pub netns: u32,
    pub name: String,
    pub kind: Kind,
    /// The outer source address it accepts packets from.
    pub remote: IpAddr,
    /// Its outer local address; `None` when any local address will do.
    pub local: Option<IpAddr>,
    /// The outer protocols it receives: GRE, or IPIP and IPv6-in-IP for the IP tunnels.
    pub protocols: Vec<u8>,
    /// GRO is on for it (`ethtool -k`): it merges the inner segments before the verifier sees
    /// them, and a merged segment cannot be verified.
    pub gro_on: bool,
}

/// Whether a tunnel's inner segments are the verifier's, and why not.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Coverage {
    /// Every inner packet came through a NAT-T transport SA: verified against residual 0.
    Verified,
    /// No inbound NAT-T transport SA comes from its remote: the kernel checks its inner
    /// segments, or nothing arrives on it through IPsec.
    NoNatTSa,
    /// No inbound policy requires ESP in transport mode for this protocol from its remote.
    NotRequired { protocol: u8 },
    /// An inbound policy of equal or better priority than the one requiring ESP can let this
    /// protocol in without it (no template, an optional one, or a narrower selector).
    PlaintextAllowed { protocol: u8, priority: u32 },
}

impl Coverage {
    /// Why the tunnel is left out, for the log; empty when it is verified.
    #[must_use]
    pub fn reason(&self) -> String {
        match self {
            Self::Verified => String::new(),
            Self::NoNatTSa => "no inbound NAT-T transport SA comes from its remote".into(),
            Self::NotRequired { protocol } => format!(
                "no inbound policy requires ESP in transport mode for protocol {protocol} from its remote"
            ),
            Self::PlaintextAllowed { protocol, priority } => format!(
                "an inbound policy of priority {priority} lets protocol {protocol} from its remote in without a required ESP transport template"
            ),
        }
    }
}

/// The kernel's verdict on `tunnel` as `policies` and `sas` stand.
#[must_use]
pub fn coverage(tunnel: &Tunnel, policies: &[Policy], sas: &[Sa]) -> Coverage {
    let from_remote = |sa: &Sa| {
        sa.src == tunnel.remote && sa.skips_checksums() && tunnel.local.is_none_or(|l| sa.dst == l)
    };
    if !sas.iter().any(from_remote) {
        return Coverage::NoNatTSa;
    }
    for &protocol in &tunnel.protocols {
        let matches = |p: &&Policy| {
            p.dir == XFRM_POLICY_IN
                && p.src.contains(&tunnel.remote)
                && (p.proto == 0 || p.proto == protocol)
                && tunnel
                    .local
                    .map_or(p.dst.prefix_len() == 0, |l| p.dst.contains(&l))
        };
        // The best policy that covers every packet of this protocol and requires ESP; then no
        // policy that can match some of them may win over it without requiring ESP too.
        let Some(best) = policies
            .iter()
            .filter(matches)
            .filter(|p| p.requires_esp_transport && !p.narrowed)
            .map(|p| p.priority)
            .min()
        else {
            return Coverage::NotRequired { protocol };
        };
        let local_any = tunnel.local.is_none();
        let rival = policies.iter().find(|p| {
            p.dir == XFRM_POLICY_IN
                && p.priority <= best
                && p.src.contains(&tunnel.remote)
                && (p.proto == 0 || p.proto == protocol)
                && (local_any || tunnel.local.is_some_and(|l| p.dst.contains(&l)))
                && !p.requires_esp_transport
                && p.action != XFRM_POLICY_BLOCK
        });
        if let Some(p) = rival {
            return Coverage::PlaintextAllowed {
                protocol,
                priority: p.priority,
            };
        }
    }
    Coverage::Verified
}

/// Every tunnel device of this host and whether its inner segments are the verifier's, as the
/// SAs `sas`, the policies and the links stand now.
///
/// # Errors
/// `XfrmError` when the policy or the link dump fails.
pub fn survey(sas: &[Sa]) -> Result<Tunnels, crate::xfrm::XfrmError> {
    let links = links().map_err(|source| crate::xfrm::XfrmError::Io {
        what: "reading the tunnel devices over rtnetlink",
        source,
    })?;
    if links.is_empty() {
        return Ok(Vec::new());
    }
    let policies = crate::xfrm::dump_policies()?;
    Ok(links
        .into_iter()
        .map(|t| {
            let c = coverage(&t, &policies, sas);
            (t, c)
        })
        .collect())
}

/// Every tunnel device and whether its inner segments are the verifier's.
pub type Tunnels = Vec<(Tunnel, Coverage)>;

/// The tunnel a link message describes: a GRE, IPIP, SIT or ip6 tunnel with a fixed remote.
/// Fallback devices (`gre0`, `tunl0`, `sit0`, `ip6tnl0`) and tunnels without a remote accept
/// packets from anywhere and are not tunnels in this sense.
#[must_use]
pub fn from_link(m: &LinkMessage) -> Option<Tunnel> {
    let mut name = None;
    let mut kind = None;
    let mut data = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => kind = Some(k.clone()),
                        LinkInfo::Data(d) => data = Some(d),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let (kind, (local, remote, proto)) = match (kind?, data?) {
        (InfoKind::GreTun, InfoData::GreTun(d)) => (Kind::Gre, gre_ends(d)),
        (InfoKind::GreTun6, InfoData::GreTun6(d)) => (Kind::Ip6Gre, gre6_ends(d)),
        (InfoKind::IpIp, InfoData::IpTunnel(d)) => (Kind::Ipip, ip_tunnel_ends(d)),
        (InfoKind::SitTun, InfoData::IpTunnel(d)) => (Kind::Sit, ip_tunnel_ends(d)),
        (InfoKind::Ip6Tnl, InfoData::IpTunnel(d)) => (Kind::Ip6Tnl, ip_tunnel_ends(d)),
        _ => return None,
    };
    let remote = remote.filter(|r| !r.is_unspecified())?;
    let protocols = match (kind, proto) {
        (Kind::Gre | Kind::Ip6Gre, _) => vec![IPPROTO_GRE],
        (Kind::Ipip, _) => vec![IPPROTO_IPIP],
        // `mode any` (protocol 0) receives both.
        (Kind::Sit | Kind::Ip6Tnl, Some(p)) if p != 0 => vec![p],
        (Kind::Sit | Kind::Ip6Tnl, _) => vec![IPPROTO_IPIP, IPPROTO_IPV6],
    };
    Some(Tunnel {
        ifindex: m.header.index,
        netns: 0,
        name: name?,
        kind,
        remote,
        local: local.filter(|l| !l.is_unspecified()),
        protocols,
        gro_on: false,
    })
}

/// A tunnel's local and remote address and, for the IP tunnels, the protocol it carries.
type Ends = (Option<IpAddr>, Option<IpAddr>, Option<u8>);

/// One attribute of a tunnel's link data, as far as `Ends` goes.
enum End {
    Local(IpAddr),
    Remote(IpAddr),
    Protocol(u8),
    Other,
}

/// The `Ends` of a tunnel's link data, each attribute read by `end`.
fn ends<A>(data: &[A], end: impl Fn(&A) -> End) -> Ends {
    let mut e: Ends = (None, None, None);
    for a in data {
        match end(a) {
            End::Local(l) => e.0 = Some(l),
            End::Remote(r) => e.1 = Some(r),
            End::Protocol(p) => e.2 = Some(p),
            End::Other => {}
        }
    }
    e
}

fn gre_ends(d: &[InfoGre]) -> Ends {
    ends(d, |a| match a {
        InfoGre::Local(l) => End::Local(IpAddr::V4(*l)),
        InfoGre::Remote(r) => End::Remote(IpAddr::V4(*r)),
        _ => End::Other,
    })
}

fn gre6_ends(d: &[InfoGre6]) -> Ends {
    ends(d, |a| match a {
        InfoGre6::Local(l) => End::Local(IpAddr::V6(*l)),
        InfoGre6::Remote(r) => End::Remote(IpAddr::V6(*r)),
        _ => End::Other,
    })
}

fn ip_tunnel_ends(d: &[InfoIpTunnel]) -> Ends {
    ends(d, |a| match a {
        InfoIpTunnel::Local(l) => End::Local(*l),
        InfoIpTunnel::Remote(r) => End::Remote(*r),
        InfoIpTunnel::Protocol(p) => End::Protocol(u8::from(*p)),
        _ => End::Other,
    })
}

/// Reads every tunnel device of this network namespace.
///
/// # Errors
/// Socket errors, a refused dump, or a message that does not parse.
pub fn links() -> io::Result<Vec<Tunnel>> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetLink(LinkMessage::default()));
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    req.header.sequence_number = 1;
    req.finalize();
    let mut out = vec![0; req.buffer_len()];
    req.serialize(&mut out);
    sock.send(&out, 0)?;
    let netns = this_netns()?;
    let mut tunnels = BTreeSet::new();
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        sock.recv(&mut buf, 0)?;
        let mut off = 0;
        while off + NLMSG_HDRLEN <= buf.len() {
            let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]);
            let len = len as usize;
            if len < NLMSG_HDRLEN || off + len > buf.len() {
                return Err(io::Error::other(format!(
                    "rtnetlink message length {len} at offset {off} of a {}-byte datagram",
                    buf.len()
                )));
            }
            let message = &buf[off..off + len];
            off += (len + 3) & !3;
            match u16::from_ne_bytes([message[4], message[5]]) {
                NLMSG_DONE => return Ok(tunnels.into_iter().collect()),
                NLMSG_ERROR => {
                    let code = message
                        .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                        .map_or(0, |c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
                    if code != 0 {
                        return Err(io::Error::other(format!(
                            "the link dump was refused: {}",
                            io::Error::from_raw_os_error(code.saturating_neg())
                        )));
                    }
                }
                RTM_NEWLINK => {
                    if let Some(l) = decode_link(message) {
                        tunnels.extend(from_link(&l).map(|t| Tunnel {
                            netns,
                            // A device that went meanwhile answers nothing: it is listed no
                            // longer after the next pass.
                            gro_on: gro_on(&t.name).unwrap_or(false),
                            ..t
                        }));
                    }
                }
                _ => {}
            }
        }
    }
}

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;

/// One link message, parsed by netlink-packet-route. A link it cannot parse (an attribute it
/// does not know how to read, or a panic in it) is left out rather than failing the dump: one
/// exotic device must not stop discovery. The first such failure is logged, once per process.
fn decode_link(message: &[u8]) -> Option<LinkMessage> {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let parsed =
        std::panic::catch_unwind(|| NetlinkMessage::<RouteNetlinkMessage>::deserialize(message));
    let error = match parsed {
        Ok(Ok(m)) => match m.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => return Some(l),
            _ => return None,
        },
        Ok(Err(e)) => e.to_string(),
        Err(_) => "netlink-packet-route panicked".to_owned(),
    };
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(error = %error, "a link message could not be parsed and is left out of the tunnel devices (logged once)");
    }
    None
}

/// `RTNLGRP_LINK`: link notifications (a device added, removed, or its features changed).
const RTNLGRP_LINK: u32 = 1;

/// A socket subscribed to the kernel's link notifications, so that a tunnel device that comes,
/// goes, or has GRO turned on or off is noticed at once rather than at the next re-read.
#[derive(Debug)]
pub struct LinkWatch {
    sock: Socket,
    buf: Vec<u8>,
}

impl std::os::fd::AsRawFd for LinkWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }
}

impl LinkWatch {
    /// Subscribes, non-blocking.
    ///
    /// # Errors
    /// The socket cannot be opened or joined to the group.
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.add_membership(RTNLGRP_LINK)?;
        sock.set_non_blocking(true)?;
        Ok(Self {
            sock,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// Reads whatever is queued without blocking; how many datagrams. An overrun (ENOBUFS)
    /// counts as one: the caller re-reads everything anyway.
    ///
    /// # Errors
    /// Socket errors other than "nothing queued" and "overrun".
    pub fn read_pending(&mut self) -> io::Result<usize> {
        let mut n = 0;
        loop {
            self.buf.clear();
            match self.sock.recv(&mut self.buf, 0) {
                Ok(_) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => n += 1,
                Err(e) => return Err(e),
            }
        }
    }
}

/// `ETHTOOL_GGRO` (linux/ethtool.h): read a device's GRO flag.
const ETHTOOL_GGRO: u32 = 0x2b;

/// Whether GRO is on for the device `name`, as `ethtool -k` shows it (the `SIOCETHTOOL` ioctl's
/// `ETHTOOL_GGRO`).
///
/// # Errors
/// The socket or the ioctl failed (no such device).
pub fn gro_on(name: &str) -> io::Result<bool> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

    /// `struct ethtool_value`.
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    /// `struct ifreq` with `ifr_data`: the name, then a pointer in a 24-byte union.
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        pad: [u8; 16],
    }
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!(
            "{name:?} is not an interface name"
        )));
    }
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor this function just opened and nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut value = EthtoolValue {
        cmd: ETHTOOL_GGRO,
        data: 0,
    };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &raw mut value,
        pad: [0; 16],
    };
    for (d, b) in req.name.iter_mut().zip(name.bytes()) {
        *d = b.cast_signed();
    }
    // SAFETY: SIOCETHTOOL reads `req` and writes `value`, both alive for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCETHTOOL, &raw mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data != 0)
}

/// The inode number of this process's network namespace, as the kernel's `net->ns.inum`.
fn this_netns() -> io::Result<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata("/proc/self/ns/net")?.ino();
    u32::try_from(ino)
        .map_err(|_| io::Error::other(format!("network namespace inode {ino} is past 32 bits")))
}

/// The address a tunnel is shown with in logs when it has no local one.
#[must_use]
pub fn show_local(t: &Tunnel) -> IpAddr {
    t.local.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

#[cfg(test)]
mod tests;
