//! The learning ring's records, in the state task: samples for SAs that learn their residual,
//! and the verifier's news (a residual inherited across a rekey, confirmed, withdrawn).

use monitor_ebpf::{PROTO_COUNT, Proto};
use tracing::{error, info, warn};

use super::SaState;
use crate::{
    events::{Learning, LearningKind},
    learn::{Outcome, WINDOW},
    peers::PeerSpec,
    residuals::Judged,
};

impl SaState {
    /// Takes one record of the learning ring: a sample for an SA that learns, or news from the
    /// verifier about an SA's residual.
    pub(super) fn sample(&mut self, m: &Learning) {
        // Records of a peer that no longer learns (reloaded, removed) are stale.
        if !self.table.learns(m.peer_id()) {
            return;
        }
        let label = self
            .table
            .get(m.peer_id())
            .map_or_else(String::new, PeerSpec::label);
        let spi = format_args!("{:#010x}", m.spi);
        let residual = format_args!("{:#06x}", m.residual);
        match m.kind {
            LearningKind::Inherited | LearningKind::Confirmed => {
                let judged = self.residuals.installed(m.key, m.residual);
                self.judged(m, &label, m.residual, judged);
                self.publish();
                let how = if m.kind == LearningKind::Inherited {
                    "NAT residual inherited from a live SA of the same NAT mapping (a rekey); verifying this SA from its first segment"
                } else {
                    "NAT residual learned in the kernel: a segment summed to it with no NAT in the path, or TCP retransmitted a refused segment and the copy left the same value; verifying this SA from now on"
                };
                info!(
                    peer = label,
                    spi = %spi,
                    reqid = m.reqid,
                    encap_ports = %format_args!("{}/{}", m.encap_ports().0, m.encap_ports().1),
                    residual = %residual,
                    "{how}"
                );
            }
            LearningKind::Withdrawn { found } => {
                self.residuals.forgotten(m.key);
                self.publish();
                warn!(
                    peer = label,
                    spi = %spi,
                    learned = %residual,
                    found = %format_args!("{found:#06x}"),
                    segments = monitor_ebpf::WITHDRAW_AFTER,
                    "learned NAT residual withdrawn: consecutive distinct segments of the SA all left one other value and none verified in between, so it refused intact traffic; learning again"
                );
            }
            LearningKind::Sample { held, proto } => {
                self.learn(m, &label, if held { None } else { proto });
            }
        }
    }

    /// Counts the learning segments of `m`'s SA that were delivered and, judged against the
    /// residual it now has, were corrupt; says so in the log.
    fn judged(&mut self, m: &Learning, label: &str, residual: u16, judged: Judged) {
        if judged.iter().all(|n| *n == 0) {
            return;
        }
        let total = self.learning_mismatches.entry(m.peer_id()).or_default();
        for (t, n) in total.iter_mut().zip(judged) {
            *t += n;
        }
        warn!(
            peer = label,
            spi = %format_args!("{:#010x}", m.spi),
            residual = %format_args!("{residual:#06x}"),
            tcp = judged[Proto::Tcp as usize],
            udp = judged[Proto::Udp as usize],
            "segments passed unverified while this SA's NAT residual was being learned left another value: corrupted segments were delivered (natt_monitor_learning_mismatches_total)"
        );
    }

    /// Feeds one learning segment's residual to the learner (`delivered`: its protocol, if the
    /// verifier passed it); when it settles, installs the residual so the SA's next segment is
    /// verified.
    fn learn(&mut self, m: &Learning, label: &str, delivered: Option<Proto>) {
        let key = m.key;
        if self.residuals.get(&key).is_some() {
            // Held as learned, yet the verifier sent a sample: it has forgotten the residual
            // (LRU), or the entry is another SA's (one that held the same SPI on the same
            // mapping), unless this sample was in the ring when the residual was installed.
            match self.maps.sa_residual(&key) {
                Ok(Some((state, _))) if state == m.state => {
                    // In the ring while the residual was installed: judged now.
                    if let Some(proto) = delivered
                        && let Some(residual) = self.residuals.get(&key)
                        && residual != m.residual
                    {
                        let mut judged = [0; PROTO_COUNT];
                        judged[proto as usize] = 1;
                        self.judged(m, label, residual, judged);
                        self.publish();
                    }
                    return;
                }
                Ok(_) => {
                    self.residuals.forgotten(key);
                    self.evicted += 1;
                    self.publish();
                    warn!(
                        peer = label,
                        spi = %format_args!("{:#010x}", m.spi),
                        "the verifier's SA_TRUST map no longer holds this SA's residual (its LRU forgot it; raise --max-peers if this repeats); learning again"
                    );
                }
                Err(e) => {
                    error!(peer = label, error = %e, "could not read SA_TRUST");
                    return;
                }
            }
        }
        let Some(outcome) = self.residuals.sample(key, m.residual, delivered) else {
            return;
        };
        match outcome {
            Outcome::Pending => {}
            Outcome::Restarted { top } => warn!(
                peer = label,
                spi = %format_args!("{:#010x}", m.spi),
                most_common = %format_args!("{:#06x}", top.0),
                count = top.1,
                window = WINDOW,
                "NAT residual did not settle: no value carried three quarters of the segments; learning again"
            ),
            Outcome::Learned { residual, samples } => {
                match self.maps.set_sa_residual(key, m.state, residual) {
                    Ok(()) => {
                        let judged = self.residuals.installed(key, residual);
                        self.judged(m, label, residual, judged);
                        self.publish();
                        info!(
                            peer = label,
                            spi = %format_args!("{:#010x}", m.spi),
                            reqid = m.reqid,
                            encap_ports = %format_args!("{}/{}", m.encap_ports().0, m.encap_ports().1),
                            residual = %format_args!("{residual:#06x}"),
                            samples,
                            "NAT residual learned; verifying this SA from now on"
                        );
                    }
                    Err(e) => {
                        error!(peer = label, error = %e, "could not install the learned residual; still learning");
                    }
                }
            }
        }
    }
}
