//! Tunnel discovery from netlink messages and SAs, and the coverage rules, on built messages.

use ipnet::IpNet;
use netlink_packet_xfrm::XFRM_POLICY_ALLOW;

use super::*;

/// No inbound policy requires ESP for the tunnel's GRE.
/// An inbound policy of priority 100 that requires ESP for GRE from `src` to `dst`.
fn required_gre(src: &str, dst: &str) -> Policy {
    policy(src, dst, IPPROTO_GRE, 100, true)
}

const GRE_NOT_REQUIRED: Coverage = Coverage::NotRequired {
    protocol: IPPROTO_GRE,
};

fn gre(remote: &str, local: Option<&str>) -> Tunnel {
    Tunnel {
        ifindex: 7,
        netns: 4_026_531_840,
        name: "gre-nm".into(),
        kind: Kind::Gre,
        remote: remote.parse().unwrap(),
        local: local.map(|l| l.parse().unwrap()),
        protocols: vec![IPPROTO_GRE],
        gro_on: false,
    }
}

fn natt_sa(src: &str, dst: &str) -> Sa {
    Sa {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        spi: 0x100,
        proto: netlink_packet_xfrm::IPPROTO_ESP,
        mode: netlink_packet_xfrm::XFRM_MODE_TRANSPORT,
        encap: Some((netlink_packet_xfrm::UDP_ENCAP_ESPINUDP, 4500, 4500)),
    }
}

fn policy(src: &str, dst: &str, proto: u8, priority: u32, requires: bool) -> Policy {
    Policy {
        dir: XFRM_POLICY_IN,
        action: XFRM_POLICY_ALLOW,
        priority,
        src: src.parse::<IpNet>().unwrap(),
        dst: dst.parse::<IpNet>().unwrap(),
        proto,
        narrowed: false,
        requires_esp_transport: requires,
    }
}

const R: &str = "198.51.100.7";
const L: &str = "192.0.2.1";

#[test]
fn a_gre_tunnel_that_a_required_natt_transport_policy_covers_is_verified() {
    let t = gre(R, Some(L));
    let sas = [natt_sa(R, L)];
    let p = [required_gre("198.51.100.7/32", "192.0.2.1/32")];
    assert_eq!(coverage(&t, &p, &sas), Coverage::Verified);
    // Protocol "any" covers GRE too.
    let any = [policy("198.51.100.0/24", "0.0.0.0/0", 0, 100, true)];
    assert_eq!(coverage(&t, &any, &sas), Coverage::Verified);
}

#[test]
fn a_tunnel_is_left_out_without_a_natt_sa_from_its_remote() {
    let t = gre(R, Some(L));
    let p = [required_gre("198.51.100.7/32", "192.0.2.1/32")];
    assert_eq!(coverage(&t, &p, &[]), Coverage::NoNatTSa);
    let mut plain = natt_sa(R, L);
    plain.encap = None;
    assert_eq!(coverage(&t, &p, &[plain]), Coverage::NoNatTSa);
    assert_eq!(
        coverage(&t, &p, &[natt_sa("198.51.100.8", L)]),
        Coverage::NoNatTSa
    );
}

#[test]
fn a_policy_for_another_protocol_an_optional_template_or_an_outbound_one_is_not_enough() {
    let t = gre(R, Some(L));
    let sas = [natt_sa(R, L)];
    let tcp = [policy("198.51.100.7/32", "192.0.2.1/32", 6, 100, true)];
    assert_eq!(coverage(&t, &tcp, &sas), GRE_NOT_REQUIRED);
    let optional = [policy(
        "198.51.100.7/32",
        "192.0.2.1/32",
        IPPROTO_GRE,
        100,
        false,
    )];
    assert_eq!(coverage(&t, &optional, &sas), GRE_NOT_REQUIRED);
    let mut out = required_gre("198.51.100.7/32", "192.0.2.1/32");
    out.dir = netlink_packet_xfrm::XFRM_POLICY_OUT;
    assert_eq!(coverage(&t, &[out], &sas), GRE_NOT_REQUIRED);
    let mut narrowed = required_gre("198.51.100.7/32", "192.0.2.1/32");
    narrowed.narrowed = true;
    assert_eq!(coverage(&t, &[narrowed], &sas), GRE_NOT_REQUIRED);
}

#[test]
fn a_policy_that_wins_without_esp_lets_plaintext_in_and_one_that_loses_does_not() {
    let t = gre(R, Some(L));
    let sas = [natt_sa(R, L)];
    let required = required_gre("198.51.100.7/32", "192.0.2.1/32");
    let bypass = policy("198.51.100.0/24", "0.0.0.0/0", 0, 50, false);
    assert_eq!(
        coverage(&t, &[required.clone(), bypass.clone()], &sas),
        Coverage::PlaintextAllowed {
            protocol: IPPROTO_GRE,
            priority: 50
        }
    );
    let mut loses = bypass.clone();
    loses.priority = 200;
    assert_eq!(
        coverage(&t, &[required.clone(), loses], &sas),
        Coverage::Verified
    );
    // A block policy lets nothing in.
    let mut block = bypass;
    block.action = XFRM_POLICY_BLOCK;
    assert_eq!(coverage(&t, &[required, block], &sas), Coverage::Verified);
}

#[test]
fn a_tunnel_without_a_local_address_needs_a_policy_for_every_destination() {
    let t = gre(R, None);
    let sas = [natt_sa(R, L)];
    let one_dst = [required_gre("198.51.100.7/32", "192.0.2.1/32")];
    assert_eq!(coverage(&t, &one_dst, &sas), GRE_NOT_REQUIRED);
    let any_dst = [required_gre("198.51.100.7/32", "0.0.0.0/0")];
    assert_eq!(coverage(&t, &any_dst, &sas), Coverage::Verified);
}

#[test]
fn an_ip_tunnel_in_mode_any_needs_both_protocols_covered() {
    let mut t = gre(R, Some(L));
    t.kind = Kind::Sit;
    t.protocols = vec![IPPROTO_IPIP, IPPROTO_IPV6];
    let sas = [natt_sa(R, L)];
    let only_v6 = [policy(
        "198.51.100.7/32",
        "192.0.2.1/32",
        IPPROTO_IPV6,
        100,
        true,
    )];
    assert_eq!(
        coverage(&t, &only_v6, &sas),
        Coverage::NotRequired {
            protocol: IPPROTO_IPIP
        }
    );
    let any = [policy("198.51.100.7/32", "192.0.2.1/32", 0, 100, true)];
    assert_eq!(coverage(&t, &any, &sas), Coverage::Verified);
}

#[test]
fn the_links_of_this_namespace_parse() {
    // Whatever this host has (loopback at least), the dump parses; fallback devices with no
    // remote are never tunnels.
    let tunnels = links().expect("rtnetlink link dump");
    assert!(tunnels.iter().all(|t| !t.remote.is_unspecified()));
    assert!(
        tunnels
            .iter()
            .all(|t| !matches!(t.name.as_str(), "gre0" | "tunl0" | "sit0"))
    );
}

#[test]
fn gro_is_read_for_a_device_and_a_missing_one_is_an_error() {
    // Loopback has GRO on by default; what matters is that the ioctl answers.
    gro_on("lo").expect("ETHTOOL_GGRO on lo");
    let e = gro_on("no-such-dev0").expect_err("no such device");
    assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
    assert!(gro_on("").is_err());
    assert!(gro_on("a-name-past-sixteen-bytes").is_err());
}

#[test]
fn a_gre_link_message_becomes_a_tunnel_and_garbage_is_left_out() {
    use netlink_packet_route::link::{LinkAttribute, LinkInfo};
    let mut link = LinkMessage::default();
    link.header.index = 42;
    link.attributes = vec![
        LinkAttribute::IfName("gnm".into()),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::GreTun),
            LinkInfo::Data(InfoData::GreTun(vec![
                InfoGre::Local(Ipv4Addr::new(192, 0, 2, 1)),
                InfoGre::Remote(Ipv4Addr::new(198, 51, 100, 7)),
            ])),
        ]),
    ];
    let mut m = NetlinkMessage::from(RouteNetlinkMessage::NewLink(link));
    m.finalize();
    let mut bytes = vec![0; m.buffer_len()];
    m.serialize(&mut bytes);
    let t = from_link(&decode_link(&bytes).expect("a link message")).expect("a tunnel");
    assert_eq!(
        (
            t.ifindex,
            t.name.as_str(),
            t.kind,
            t.remote,
            t.local,
            t.protocols
        ),
        (
            42,
            "gnm",
            Kind::Gre,
            "198.51.100.7".parse().unwrap(),
            Some("192.0.2.1".parse().unwrap()),
            vec![IPPROTO_GRE]
        )
    );
    // A fallback device (no remote) is no tunnel.
    let mut fallback = LinkMessage::default();
    fallback.attributes = vec![
        LinkAttribute::IfName("gre0".into()),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::GreTun),
            LinkInfo::Data(InfoData::GreTun(vec![InfoGre::Remote(
                Ipv4Addr::UNSPECIFIED,
            )])),
        ]),
    ];
    assert_eq!(from_link(&fallback), None);
    // A header that claims a link but carries nothing parsable.
    let mut garbage = vec![0u8; 20];
    garbage[..4].copy_from_slice(&20u32.to_ne_bytes());
    garbage[4..6].copy_from_slice(&RTM_NEWLINK.to_ne_bytes());
    garbage[16..].fill(0xff);
    assert!(decode_link(&garbage).is_none());
}
