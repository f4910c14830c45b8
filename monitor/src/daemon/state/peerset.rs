//! How static and discovered peers become one table that fits: merged (static prefixes win),
//! scoped (what learns, what only observes), and cut to the maps' capacity.

use ipnet::IpNet;
use tracing::warn;

use crate::{
    peers::{Mode, PeerSpec, PeerTable, Source},
    scope::Scope,
};

/// The peers to verify: every static peer, then each discovered peer whose address no static
/// prefix already covers (an operator's explicit entry wins over discovery).
pub(super) fn merge(statics: &[PeerSpec], discovered: &[PeerSpec]) -> Vec<PeerSpec> {
    let mut out = statics.to_vec();
    out.extend(
        discovered
            .iter()
            .filter(|d| {
                if d.source == Source::Undiscovered {
                    // A static catch-all of the same family takes its place.
                    !statics.iter().any(|s| s.net == d.net)
                } else {
                    !statics.iter().any(|s| s.net.contains(&d.net.addr()))
                }
            })
            .cloned(),
    );
    out
}

/// The peers that fit in `table`'s limit: every static one, then SA scope's catch-alls, then
/// the discovered ones, those already in `table` first (they keep their ids and counts) and
/// the rest in the order discovery gave them; and how many were left out. Static peers past
/// the limit stay in, for `PeerTable::reconcile` to refuse: the configuration asked for them,
/// and `config::resolve` already refuses such a configuration by name.
pub(super) fn fit(mut peers: Vec<PeerSpec>, table: &PeerTable) -> (Vec<PeerSpec>, usize) {
    let limit = table.limit() as usize;
    if peers.len() <= limit {
        return (peers, 0);
    }
    let known: std::collections::HashSet<IpNet> = table.iter().map(|(_, p)| p.net).collect();
    peers.sort_by_key(|p| match p.source {
        Source::Static => 0,
        Source::Undiscovered => 1,
        Source::Xfrm if known.contains(&p.net) => 2,
        Source::Xfrm => 3,
    });
    let statics = peers.iter().filter(|p| p.source == Source::Static).count();
    let keep = limit.max(statics);
    let over = peers.len() - keep;
    peers.truncate(keep);
    (peers, over)
}

/// Says that `n` peers did not fit in `limit` (nothing when `n` is 0).
pub(super) fn warn_over_limit(n: usize, limit: u32) {
    if n > 0 {
        warn!(
            peers = n,
            max_peers = limit,
            "discovered peers past --max-peers have no entry of their own: under SA scope their SAs are verified by the catch-alls while those fit, under address scope they are not verified; raise --max-peers (natt_monitor_peers_over_limit counts them)"
        );
    }
}

/// Under SA scope, `discovered` and after them the two catch-alls (`Source::Undiscovered`):
/// every NAT-T transport SA whose segments no other peer names is verified too, whatever
/// network namespace it lives in and whether or not discovery runs. They take the discovered
/// peers' mode and learn each SA's residual like them.
pub(super) fn with_undiscovered(scope: Scope, mut discovered: Vec<PeerSpec>) -> Vec<PeerSpec> {
    if matches!(scope, Scope::Sa(_)) {
        for net in [
            IpNet::V4(ipnet::Ipv4Net::default()),
            IpNet::V6(ipnet::Ipv6Net::default()),
        ] {
            let mut p = PeerSpec::new(net, Mode::Observe);
            p.source = Source::Undiscovered;
            discovered.push(p);
        }
    }
    discovered
}

/// Discovered peers take the default mode in force, whatever discovery was started with.
pub(super) fn in_mode(mode: Mode, mut specs: Vec<PeerSpec>) -> Vec<PeerSpec> {
    for p in &mut specs {
        p.mode = mode;
    }
    specs
}

/// True when `a` and `b` differ in more than their mode: a mode change keeps the residuals,
/// which depend on addresses only.
pub(super) fn changed_beyond_mode(a: &PeerSpec, b: &PeerSpec) -> bool {
    PeerSpec {
        mode: a.mode,
        ..b.clone()
    } != *a
}

/// Under SA scope every peer without configured NAT addresses learns its residual per SA, and
/// a rekey (a new discovery generation) is no reason to forget anything: the verifier hands the
/// residual on to the new SA itself. Under address scope a static peer without NAT addresses
/// has residual 0 and a discovered one learns again when its SAs change; and there a learned
/// residual is a guess (plaintext and decapsulated segments of one address pair cannot be told
/// apart), so a peer that learns is only observed, never enforced.
pub(super) fn scoped(scope: Scope, mut specs: Vec<PeerSpec>) -> Vec<PeerSpec> {
    for p in &mut specs {
        match scope {
            Scope::Sa(_) => {
                p.learn = p.nat.is_none();
                p.generation = 0;
            }
            Scope::Address if p.learn => p.mode = Mode::Observe,
            Scope::Address => {}
        }
    }
    specs
}

/// Peers of `specs` that ask for enforce mode but learn their residual under address scope, and
/// so run in observe mode (`scoped`).
pub(super) fn observe_only(scope: Scope, specs: &[PeerSpec]) -> usize {
    if matches!(scope, Scope::Sa(_)) {
        return 0;
    }
    specs
        .iter()
        .filter(|p| p.learn && p.mode == Mode::Enforce)
        .count()
}

/// Says that address scope keeps `n` learned peers in observe mode (nothing when `n` is 0).
pub(super) fn warn_observe_only(n: usize) {
    if n > 0 {
        warn!(
            peers = n,
            "address scope: peers whose NAT residual is learned run in observe mode, whatever their mode says (a learned residual is a guess there; enforce needs an exact one: configure the peer's original addresses, or run on a kernel with BTF for SA scope); natt_monitor_peers_observe_only counts them"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::parse_cidr;

    fn spec(net: &str, source: Source) -> PeerSpec {
        let mut p = PeerSpec::new(parse_cidr(net).unwrap(), Mode::Observe);
        p.source = source;
        p
    }

    #[test]
    fn static_prefixes_win_over_discovered_addresses_they_cover() {
        let statics = [spec("192.0.2.0/24", Source::Static)];
        let discovered = [
            spec("192.0.2.9", Source::Xfrm),
            spec("198.51.100.7", Source::Xfrm),
        ];
        let merged: Vec<String> = merge(&statics, &discovered)
            .iter()
            .map(PeerSpec::label)
            .collect();
        assert_eq!(merged, ["192.0.2.0/24", "198.51.100.7/32"]);
    }

    /// Past the limit, statics stay, then the catch-alls, then discovered peers the table already
    /// holds (their ids and counts), then new ones in discovery order; the rest are counted.
    #[test]
    fn peers_past_the_limit_are_left_out_in_order_and_counted() {
        let old = PeerTable::with_limit(4)
            .reconcile(vec![spec("198.51.100.9", Source::Xfrm)])
            .unwrap();
        let peers = vec![
            spec("198.51.100.7", Source::Xfrm),
            spec("198.51.100.8", Source::Xfrm),
            spec("198.51.100.9", Source::Xfrm),
            spec("192.0.2.0/24", Source::Static),
            spec("0.0.0.0/0", Source::Undiscovered),
            spec("::/0", Source::Undiscovered),
        ];
        let (kept, over) = fit(peers.clone(), &old);
        let nets: Vec<String> = kept.iter().map(|p| p.net.to_string()).collect();
        assert_eq!(
            nets,
            ["192.0.2.0/24", "0.0.0.0/0", "::/0", "198.51.100.9/32"]
        );
        assert_eq!(over, 2);
        let table = old.reconcile(kept).unwrap();
        // The peer that stayed kept its id.
        assert_eq!(
            table.get(0).map(PeerSpec::label).as_deref(),
            Some("198.51.100.9/32")
        );
        // Within the limit nothing moves.
        let (kept, over) = fit(peers[..4].to_vec(), &old);
        assert_eq!((kept.len(), over), (4, 0));
        // Statics past the limit are not cut: reconcile refuses them as a configuration error.
        let statics: Vec<PeerSpec> = (1..=5)
            .map(|i| spec(&format!("192.0.2.{i}"), Source::Static))
            .collect();
        let (kept, over) = fit(statics, &old);
        assert_eq!((kept.len(), over), (5, 0));
        assert!(matches!(
            old.reconcile(kept),
            Err(crate::peers::PeerError::TooMany { count: 5, .. })
        ));
    }

    /// Under SA scope the two catch-alls follow the discovered peers, take their mode and learn;
    /// a static peer of exactly their prefix takes one's place. Address scope has none.
    #[test]
    fn sa_scope_adds_the_undiscovered_catch_alls() {
        let sa = Scope::Sa(monitor_ebpf::SecpathLayout::default());
        let discovered = vec![spec("198.51.100.7", Source::Xfrm)];
        let specs = scoped(
            sa,
            in_mode(Mode::Enforce, with_undiscovered(sa, discovered.clone())),
        );
        let seen: Vec<(String, Source, Mode, bool)> = specs
            .iter()
            .map(|p| (p.net.to_string(), p.source, p.mode, p.learn))
            .collect();
        assert_eq!(
            seen,
            [
                ("198.51.100.7/32".into(), Source::Xfrm, Mode::Enforce, true),
                (
                    "0.0.0.0/0".into(),
                    Source::Undiscovered,
                    Mode::Enforce,
                    true
                ),
                ("::/0".into(), Source::Undiscovered, Mode::Enforce, true),
            ]
        );
        assert_eq!(specs[1].label(), "undiscovered");
        let statics = [spec("::/0", Source::Static)];
        let merged: Vec<(String, String)> = merge(&statics, &specs)
            .iter()
            .map(|p| (p.net.to_string(), p.label()))
            .collect();
        assert_eq!(
            merged,
            [
                ("::/0".into(), "::/0".into()),
                ("198.51.100.7/32".into(), "198.51.100.7/32".into()),
                ("0.0.0.0/0".into(), "undiscovered".into()),
            ]
        );
        assert_eq!(
            with_undiscovered(Scope::Address, discovered.clone()),
            discovered
        );
    }

    /// A reload's `mode` reaches discovered peers, and a change of mode alone keeps what was
    /// learned for them.
    #[test]
    fn discovered_peers_take_the_mode_in_force_and_keep_residuals_across_it() {
        let p = spec("192.0.2.9", Source::Xfrm);
        let enforced = in_mode(Mode::Enforce, vec![p.clone()]);
        assert_eq!(enforced[0].mode, Mode::Enforce);
        assert!(!changed_beyond_mode(&p, &enforced[0]));
        let mut moved = enforced[0].clone();
        moved.net = parse_cidr("192.0.2.10").unwrap();
        assert!(changed_beyond_mode(&p, &moved));
    }

    #[test]
    fn sa_scope_learns_every_peer_without_nat_addresses() {
        let mut p = spec("192.0.2.9", Source::Xfrm);
        p.generation = 42;
        let layout = monitor_ebpf::SecpathLayout {
            enabled: 1,
            ..Default::default()
        };
        let out = scoped(Scope::Sa(layout), vec![p.clone()]);
        assert!(out[0].learn);
        assert_eq!(out[0].generation, 0);
        let out = scoped(Scope::Address, vec![p]);
        assert!(!out[0].learn);
        assert_eq!(out[0].generation, 42);
    }

    /// Address scope never drops on a guess: a peer that learns its residual there is observed
    /// whatever mode it asks for; one whose residual is exact keeps enforce.
    #[test]
    fn address_scope_enforces_only_exact_residuals() {
        let mut learned = spec("192.0.2.9", Source::Xfrm);
        learned.learn = true;
        learned.mode = Mode::Enforce;
        let mut exact = spec("198.51.100.0/24", Source::Static);
        exact.mode = Mode::Enforce;
        let specs = vec![learned, exact];
        assert_eq!(observe_only(Scope::Address, &specs), 1);
        let out = scoped(Scope::Address, specs.clone());
        assert_eq!(
            out.iter().map(|p| p.mode).collect::<Vec<_>>(),
            [Mode::Observe, Mode::Enforce]
        );
        let sa = Scope::Sa(monitor_ebpf::SecpathLayout {
            enabled: 1,
            ..Default::default()
        });
        assert_eq!(observe_only(sa, &specs), 0);
        assert!(scoped(sa, specs).iter().all(|p| p.mode == Mode::Enforce));
    }
}
