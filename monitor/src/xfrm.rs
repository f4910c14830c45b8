//! XFRM discovery (`--discover xfrm`): the peers whose segments the kernel marks "checksum OK"
//! without checking are exactly the sources of this host's inbound transport-mode SAs with UDP
//! (or TCP) encapsulation. This module reads them over XFRM netlink (parsed by the maintained
//! `netlink-packet-xfrm` crate) and watches the kernel's SA notifications so peers come and go
//! with the SAs.
//!
//! The watcher does not interpret individual notifications: any message on the SA or expire
//! groups (new, update, delete, expire, flush), and a socket overrun, trigger a full re-read of
//! the SA database, which is small and cheap to dump. A periodic re-read backs that up.

use std::{
    collections::BTreeMap,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    os::fd::{AsRawFd, RawFd},
};

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_xfrm::{
    IPPROTO_ESP, TCP_ENCAP_ESPINTCP, UDP_ENCAP_ESPINUDP, XFRM_MODE_TRANSPORT, XFRM_POLICY_ALLOW,
    XFRMNLGRP_EXPIRE, XFRMNLGRP_POLICY, XFRMNLGRP_SA, XfrmAttrs, XfrmMessage,
    policy::DelGetMessage as PolicyDelGetMessage, state::GetDumpMessage,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_XFRM};

use crate::peers::{Mode, PeerSpec, Source};

/// What natt-monitor needs to know about one SA.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sa {
    /// Outer source address (the peer, as it reaches us: after any NAT).
    pub src: IpAddr,
    /// Outer destination address.
    pub dst: IpAddr,
    /// Security parameter index (host order).
    pub spi: u32,
    /// IPsec protocol (50 = ESP).
    pub proto: u8,
    /// `XFRM_MODE_*`.
    pub mode: u8,
    /// Encapsulation type and ports (host order), if any.
    pub encap: Option<(u16, u16, u16)>,
}

impl Sa {
    /// True for the SAs whose decapsulated segments skip the checksum check: ESP in transport
    /// mode with UDP (NAT-T) or TCP (RFC 8229) encapsulation.
    #[must_use]
    pub fn skips_checksums(&self) -> bool {
        self.proto == IPPROTO_ESP
            && self.mode == XFRM_MODE_TRANSPORT
            && matches!(self.encap, Some((t, _, _)) if t == UDP_ENCAP_ESPINUDP || t == TCP_ENCAP_ESPINTCP)
    }

    pub(crate) fn from_message(m: &netlink_packet_xfrm::state::ModifyMessage) -> Option<Self> {
        let info = &m.user_sa_info;
        let addr = |a: &netlink_packet_xfrm::Address| -> Option<IpAddr> {
            match i32::from(info.family) {
                libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
                    a.addr[0], a.addr[1], a.addr[2], a.addr[3],
                ))),
                libc::AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(a.addr))),
                _ => None,
            }
        };
        // netlink-packet-xfrm already converts the SPI and the ports to host order.
        let encap = m.nlas.iter().find_map(|a| match a {
            XfrmAttrs::EncapsulationTemplate(e) => {
                Some((e.encap_type, e.encap_sport, e.encap_dport))
            }
            _ => None,
        });
        Some(Self {
            src: addr(&info.saddr)?,
            dst: addr(&info.id.daddr)?,
            spi: info.id.spi,
            proto: info.id.proto,
            mode: info.mode,
            encap,
        })
    }
}

/// What natt-monitor needs to know about one policy: where it applies, what it requires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `XFRM_POLICY_IN`, `_OUT` or `_FWD`.
    pub dir: u8,
    /// `XFRM_POLICY_ALLOW` or `_BLOCK`.
    pub action: u8,
    /// Lower wins.
    pub priority: u32,
    /// The selector's source and destination prefixes.
    pub src: IpNet,
    pub dst: IpNet,
    /// The selector's protocol; 0 is any.
    pub proto: u8,
    /// The selector narrows by port (or, for GRE, by key) or by interface: it matches only
    /// some of a protocol's packets.
    pub narrowed: bool,
    /// Every packet it matches must have been decapsulated by ESP in transport mode: an allow
    /// policy whose templates include a required (not `level use`) ESP transport template.
    pub requires_esp_transport: bool,
}

impl Policy {
    pub(crate) fn from_message(m: &netlink_packet_xfrm::policy::ModifyMessage) -> Option<Self> {
        let info = &m.user_policy_info;
        let sel = &info.selector;
        let net = |a: &netlink_packet_xfrm::Address, len: u8| -> Option<IpNet> {
            let addr = match i32::from(sel.family) {
                libc::AF_INET => {
                    IpAddr::V4(Ipv4Addr::new(a.addr[0], a.addr[1], a.addr[2], a.addr[3]))
                }
                libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(a.addr)),
                _ => return None,
            };
            IpNet::new(addr, len).ok().map(|n| n.trunc())
        };
        let requires_esp_transport = info.action == XFRM_POLICY_ALLOW
            && m.nlas.iter().any(|a| match a {
                XfrmAttrs::Template(ts) => ts.iter().any(|t| {
                    t.id.proto == IPPROTO_ESP && t.mode == XFRM_MODE_TRANSPORT && t.optional == 0
                }),
                _ => false,
            });
        Some(Self {
            dir: info.direction,
            action: info.action,
            priority: info.priority,
            src: net(&sel.saddr, sel.prefixlen_s)?,
            dst: net(&sel.daddr, sel.prefixlen_d)?,
            proto: sel.proto,
            narrowed: sel.sport_mask != 0 || sel.dport_mask != 0 || sel.ifindex != 0,
            requires_esp_transport,
        })
    }
}

/// The peers the SAs imply: one host prefix per source address of an inbound (`is_local(dst)`)
/// SA that skips checksums, in `mode`, learning its NAT residual. Its generation hashes the
/// SAs behind it, so a rekey or a new NAT mapping makes it learn again.
#[must_use]
pub fn peers_from(sas: &[Sa], mode: Mode, is_local: impl Fn(IpAddr) -> bool) -> Vec<PeerSpec> {
    let mut by_src: BTreeMap<IpAddr, Vec<&Sa>> = BTreeMap::new();
    // One bind per local address, not per SA: a concentrator's thousands of SAs share a few.
    let mut local: std::collections::HashMap<IpAddr, bool> = std::collections::HashMap::new();
    for sa in sas
        .iter()
        .filter(|s| s.skips_checksums() && *local.entry(s.dst).or_insert_with(|| is_local(s.dst)))
    {
        by_src.entry(sa.src).or_default().push(sa);
    }
    by_src
        .into_iter()
        .map(|(src, mut sas)| {
            sas.sort();
            let mut h = DefaultHasher::new();
            sas.hash(&mut h);
            let mut p = PeerSpec::new(IpNet::from(src), mode);
            p.learn = true;
            p.generation = h.finish();
            p.source = Source::Xfrm;
            p
        })
        .collect()
}

/// True if `addr` is one of this network namespace's addresses (it can be bound).
#[must_use]
pub fn is_local(addr: IpAddr) -> bool {
    UdpSocket::bind((addr, 0)).is_ok()
}

/// Why XFRM discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum XfrmError {
    /// The netlink socket could not be opened (no `xfrm_user`, `CONFIG_XFRM_USER`).
    #[error("opening an XFRM netlink socket (is the xfrm_user module loaded?): {0}")]
    Open(#[source] io::Error),
    /// Talking to the kernel failed.
    #[error("XFRM netlink {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel answered with an error.
    #[error("the kernel refused the SA dump: {0}")]
    Refused(String),
    /// A message did not parse.
    #[error("undecodable XFRM netlink message: {0}")]
    Decode(String),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> XfrmError {
    move |source| XfrmError::Io { what, source }
}

const RECV_BUF: usize = 64 * 1024;

/// One message of an SA dump, as `dump` needs it.
pub(crate) enum DumpItem {
    /// An SA (`XFRM_MSG_NEWSA`).
    Sa(Box<netlink_packet_xfrm::state::ModifyMessage>),
    /// A policy (`XFRM_MSG_NEWPOLICY`).
    Policy(Box<netlink_packet_xfrm::policy::ModifyMessage>),
    /// The end of the dump.
    Done,
    /// `NLMSG_ERROR` with this (negative errno) code; 0 is an acknowledgement.
    Error(i32),
    /// Anything else, ignored.
    Other,
}

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const XFRM_MSG_NEWSA: u16 = 16;
const XFRM_MSG_NEWPOLICY: u16 = 19;
/// `sizeof(struct xfrm_usersa_info)`: an SA message's fixed part.
const SA_INFO_LEN: usize = 224;
/// `sizeof(struct xfrm_userpolicy_info)`: a policy message's fixed part.
const POLICY_INFO_LEN: usize = 168;

/// Splits one datagram into its netlink messages and decodes the ones a dump carries.
///
/// Lengths are checked here before netlink-packet-xfrm sees a message: its parser indexes an SA
/// message's fixed part without checking its length and panics on a short one (found by
/// `fuzz.rs`). A panic it has anyway is caught and reported as an undecodable message.
pub(crate) fn messages(buf: &[u8]) -> Result<Vec<DumpItem>, XfrmError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        if len < 16 || off + len > buf.len() {
            return Err(XfrmError::Decode(format!(
                "message length {len} at offset {off} of a {}-byte datagram",
                buf.len()
            )));
        }
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let body = &buf[off + 16..off + len];
        out.push(match kind {
            NLMSG_DONE => DumpItem::Done,
            NLMSG_ERROR => {
                let code = body.get(..4).ok_or_else(|| {
                    XfrmError::Decode(format!("an error message of {} bytes", body.len()))
                })?;
                DumpItem::Error(i32::from_ne_bytes([code[0], code[1], code[2], code[3]]))
            }
            XFRM_MSG_NEWSA | XFRM_MSG_NEWPOLICY => {
                let (what, fixed, min) = if kind == XFRM_MSG_NEWSA {
                    ("an SA", "xfrm_usersa_info", SA_INFO_LEN)
                } else {
                    ("a policy", "xfrm_userpolicy_info", POLICY_INFO_LEN)
                };
                if body.len() < min {
                    return Err(XfrmError::Decode(format!(
                        "{what} message of {} bytes, shorter than {fixed} ({min})",
                        body.len()
                    )));
                }
                let message = &buf[off..off + len];
                let parsed = std::panic::catch_unwind(|| {
                    NetlinkMessage::<XfrmMessage>::deserialize(message)
                })
                .map_err(|_| {
                    XfrmError::Decode(format!("netlink-packet-xfrm failed on {what} message"))
                })?
                .map_err(|e| XfrmError::Decode(e.to_string()))?;
                match parsed.payload {
                    NetlinkPayload::InnerMessage(XfrmMessage::AddSa(m)) => {
                        DumpItem::Sa(Box::new(m))
                    }
                    NetlinkPayload::InnerMessage(XfrmMessage::AddPolicy(m)) => {
                        DumpItem::Policy(Box::new(m))
                    }
                    _ => DumpItem::Other,
                }
            }
            _ => DumpItem::Other,
        });
        off += (len + 3) & !3;
    }
    Ok(out)
}

/// Reads every SA of this network namespace.
///
/// # Errors
/// `XfrmError` when the socket cannot be opened or the dump fails.
pub fn dump() -> Result<Vec<Sa>, XfrmError> {
    let items = dump_items(XfrmMessage::GetDumpSa(GetDumpMessage::default()))?;
    Ok(items
        .iter()
        .filter_map(|m| match m {
            DumpItem::Sa(m) => Sa::from_message(m),
            _ => None,
        })
        .collect())
}

/// Reads every policy of this network namespace (main and sub policies alike).
///
/// # Errors
/// As `dump`.
pub fn dump_policies() -> Result<Vec<Policy>, XfrmError> {
    let items = dump_items(XfrmMessage::GetPolicy(PolicyDelGetMessage::default()))?;
    Ok(items
        .iter()
        .filter_map(|m| match m {
            DumpItem::Policy(m) => Policy::from_message(m),
            _ => None,
        })
        .collect())
}

/// Sends `request` as a dump and collects its SA and policy messages.
fn dump_items(request: XfrmMessage) -> Result<Vec<DumpItem>, XfrmError> {
    let mut sock = Socket::new(NETLINK_XFRM).map_err(XfrmError::Open)?;
    sock.bind_auto().map_err(io_err("bind"))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(io_err("connect"))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
    req.finalize();
    let mut out = vec![0; req.buffer_len()];
    req.serialize(&mut out);
    sock.send(&out, 0).map_err(io_err("send"))?;
    let mut items = Vec::new();
    let mut buf = Vec::with_capacity(RECV_BUF);
    loop {
        buf.clear();
        sock.recv(&mut buf, 0).map_err(io_err("recv"))?;
        for m in messages(&buf)? {
            match m {
                DumpItem::Done => return Ok(items),
                DumpItem::Error(0) | DumpItem::Other => {}
                DumpItem::Error(code) => {
                    return Err(XfrmError::Refused(
                        io::Error::from_raw_os_error(code.saturating_neg()).to_string(),
                    ));
                }
                item @ (DumpItem::Sa(_) | DumpItem::Policy(_)) => items.push(item),
            }
        }
    }
}

/// A socket subscribed to the kernel's SA notifications (new, update, delete, flush, expire).
#[derive(Debug)]
pub struct Watch {
    sock: Socket,
    buf: Vec<u8>,
}

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// What reading the watch socket found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Notified {
    /// SA notifications read.
    pub messages: usize,
    /// The socket overran (ENOBUFS): notifications were lost, so re-read everything.
    pub overrun: bool,
}

impl Watch {
    /// Subscribes, non-blocking.
    ///
    /// # Errors
    /// `XfrmError` when the socket cannot be opened or joined to the groups.
    pub fn open() -> Result<Self, XfrmError> {
        let mut sock = Socket::new(NETLINK_XFRM).map_err(XfrmError::Open)?;
        sock.bind_auto().map_err(io_err("bind"))?;
        for g in [XFRMNLGRP_SA, XFRMNLGRP_EXPIRE, XFRMNLGRP_POLICY] {
            sock.add_membership(g).map_err(io_err("joining a group"))?;
        }
        sock.set_non_blocking(true)
            .map_err(io_err("set non-blocking"))?;
        Ok(Self {
            sock,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Reads whatever is queued without blocking.
    ///
    /// # Errors
    /// Socket errors other than "nothing queued" and "overrun".
    pub fn read_pending(&mut self) -> Result<Notified, XfrmError> {
        let mut n = Notified::default();
        loop {
            self.buf.clear();
            match self.sock.recv(&mut self.buf, 0) {
                Ok(_) => n.messages += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => n.overrun = true,
                Err(e) => {
                    return Err(XfrmError::Io {
                        what: "reading SA notifications",
                        source: e,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(src: &str, dst: &str, spi: u32, mode: u8, encap: Option<u16>) -> Sa {
        Sa {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            spi,
            proto: IPPROTO_ESP,
            mode,
            encap: encap.map(|t| (t, 4500, 4500)),
        }
    }

    #[test]
    fn only_inbound_encapsulated_transport_sas_make_peers() {
        let local = |a: IpAddr| a == "10.2.0.2".parse::<IpAddr>().unwrap();
        let t = XFRM_MODE_TRANSPORT;
        let sas = [
            sa("10.2.0.1", "10.2.0.2", 0x100, t, Some(UDP_ENCAP_ESPINUDP)),
            // Outbound twin of the SA above: its destination is not ours.
            sa("10.2.0.2", "10.2.0.1", 0x200, t, Some(UDP_ENCAP_ESPINUDP)),
            // Plain ESP: the kernel checks these checksums itself.
            sa("10.3.0.1", "10.2.0.2", 0x300, t, None),
            // Tunnel mode.
            sa("10.4.0.1", "10.2.0.2", 0x400, 1, Some(UDP_ENCAP_ESPINUDP)),
            // ESP in TCP.
            sa("10.5.0.1", "10.2.0.2", 0x500, t, Some(TCP_ENCAP_ESPINTCP)),
        ];
        let peers = peers_from(&sas, Mode::Enforce, local);
        let got: Vec<(String, bool, Source, Mode)> = peers
            .iter()
            .map(|p| (p.label(), p.learn, p.source, p.mode))
            .collect();
        assert_eq!(
            got,
            [
                ("10.2.0.1/32".into(), true, Source::Xfrm, Mode::Enforce),
                ("10.5.0.1/32".into(), true, Source::Xfrm, Mode::Enforce),
            ]
        );
    }

    #[test]
    fn generation_follows_the_sas_not_their_order() {
        let encap = Some(UDP_ENCAP_ESPINUDP);
        let first = sa("192.0.2.1", "192.0.2.2", 1, XFRM_MODE_TRANSPORT, encap);
        let second = sa("192.0.2.1", "192.0.2.2", 2, XFRM_MODE_TRANSPORT, encap);
        let generation = |sas: &[Sa]| peers_from(sas, Mode::Observe, |_| true)[0].generation;
        assert_eq!(
            generation(&[first.clone(), second.clone()]),
            generation(&[second.clone(), first.clone()])
        );
        assert_ne!(
            generation(std::slice::from_ref(&first)),
            generation(&[first, second])
        );
    }

    #[test]
    fn a_short_sa_message_is_refused_not_a_panic() {
        // What fuzzing found: netlink-packet-xfrm 0.5 panics on this; `messages` refuses it.
        let mut m = vec![0u8; 16 + 39];
        m[..4].copy_from_slice(&55u32.to_ne_bytes());
        m[4..6].copy_from_slice(&XFRM_MSG_NEWSA.to_ne_bytes());
        let Err(e) = messages(&m) else {
            panic!("a 39-byte SA message decoded");
        };
        assert_eq!(
            e.to_string(),
            "undecodable XFRM netlink message: an SA message of 39 bytes, shorter than xfrm_usersa_info (224)"
        );
    }

    #[test]
    fn loopback_is_local_and_a_documentation_address_is_not() {
        assert!(is_local("127.0.0.1".parse().unwrap()));
        assert!(!is_local("192.0.2.77".parse().unwrap()));
    }
}
