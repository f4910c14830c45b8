//! The scenario matrix: what each scenario sets up and asserts.

use natt_monitor::peers::Mode;

use crate::plan::{Addrs, HALF_LOSS_STREAM, NULL_CIPHER, RESTART_STREAM, STREAM, V4, V6};

/// What the corruption rule on R does to the ESP packets it picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Corruption {
    /// Overwrites 32 bits with 0xdeadbeef in every `CORRUPT_EVERY`th packet: the checksum
    /// delta varies with the data.
    Word,
    /// As `Word`, with the rule in place before the SA carries its first segment: the very first
    /// data segment of the new SA is corrupted, while its residual is not known yet.
    WordFromStart,
    /// Sets one byte to 0xa5 at a fixed offset of every `every`th packet, on a stream that is
    /// one byte repeated: every corrupted segment is shifted by the same checksum delta (a
    /// stuck bit, or a fixed-offset DMA or crypto fault, on repetitive data).
    ConstantDelta {
        /// Every how many large ESP packets one is corrupted.
        every: u32,
    },
    /// Flips one bit (the lowest of a payload byte, on a stream that is one byte repeated, so
    /// it is always a change) in every `every`th packet.
    BitFlip {
        /// Every how many large ESP packets one is corrupted.
        every: u32,
    },
    /// Flips one bit (the lowest of a payload byte, on a stream that is one byte repeated) at one
    /// of eight byte offsets, both the packet and the offset drawn at random: one packet in
    /// `every` on average.
    RandomBitFlip {
        /// One large ESP packet in how many, on average, is corrupted.
        every: u32,
    },
    /// A flood while the SA learns: sets one byte at a fixed offset to 0xa5 in 7 of every 8
    /// large packets, on a stream that is one byte repeated (so every corrupted segment leaves
    /// one and the same residual), from the SA's first packet until `FLOOD_KBYTES` of packets
    /// were corrupted (an nft quota); then nothing.
    Flood,
    /// The soak draws shapes and rates from the others as it goes, on a stream that is one byte
    /// repeated.
    Drawn,
    /// Zeroes `ZERO_RUN_BYTES` (64) bytes of the payload of every `every`th packet (the stream's
    /// bytes vary, so the delta does).
    ZeroRun {
        /// Every how many large ESP packets one is corrupted.
        every: u32,
    },
}

impl Corruption {
    /// The rule is in place before the SA carries its first packet.
    pub(crate) const fn before_traffic(self) -> bool {
        matches!(self, Self::WordFromStart | Self::Flood)
    }

    /// The `--fill` byte of the stream, for a corruption that needs repetitive data.
    pub(crate) const fn fill(self) -> Option<u8> {
        match self {
            Self::Word | Self::WordFromStart | Self::ZeroRun { .. } => None,
            Self::ConstantDelta { .. }
            | Self::BitFlip { .. }
            | Self::RandomBitFlip { .. }
            | Self::Flood
            | Self::Drawn => Some(FILL),
        }
    }
}

/// The byte a constant-delta scenario's stream repeats.
pub(crate) const FILL: u8 = 0x5a;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cipher {
    Null,
    CbcAes,
}

impl Cipher {
    /// `ip xfrm state`'s `enc` algorithm and key.
    pub(crate) const fn xfrm(self) -> [&'static str; 2] {
        match self {
            Self::Null => NULL_CIPHER,
            Self::CbcAes => ["cbc(aes)", "0x00112233445566778899aabbccddeeff"],
        }
    }
}

/// Who makes the SAs and what else is special.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Setup {
    /// `ip xfrm state/policy` by hand, encapsulation sockets held by the driver.
    Manual,
    /// strongSwan's `charon` in A and B negotiates the SAs (`IKEv2`, PSK, forced UDP encapsulation,
    /// transport mode), with AES-GCM: ESP's own integrity check catches wire corruption.
    StrongSwan,
    /// As `Manual`, then the conditions under which 6.12 merges decapsulated segments (GRO on
    /// B's device, `esp4_offload`, `UDP_GRO` on the encapsulation socket), measured before and
    /// after the remedy (`gro_max_size` = MTU).
    Gro,
    /// Two senders, A and A2, with different private addresses behind R's one masquerading
    /// address, each with its own SAs to B (told apart on B by reqid and TCP port): each SA
    /// must be verified against its own residual.
    SharedNat,
    /// As `Manual`, with the verifier pinned on a bpffs that outlives the daemon: mid-stream,
    /// in enforce mode, the daemon is killed with SIGKILL and started again, and the new one
    /// adopts the pinned link and maps.
    Restart,
    /// As `Manual`, and mid-stream the SA from A to B is rekeyed by hand the way an IKE daemon
    /// does it: new SPIs installed on both ends, then A's old outbound SA deleted, so A's
    /// traffic moves to the new SA while B's old inbound SA is still alive.
    ManualRekey,
    /// As `Manual`, with the daemon's mode (`observe`) in a configuration file and no `--mode`:
    /// after the main stream the file says `enforce` and the daemon gets SIGHUP; a second
    /// stream must then be enforced for the SA's discovered peer.
    Sighup,
    /// As `Manual`, with natt-monitor in a network namespace of its own: B's SAs are in no
    /// namespace it discovers, and its verifier (at the cgroup2 root) still sees B's segments.
    Undiscovered,
    /// As `Manual`, and mid-stream A's NAT mapping moves to another public port (R's UDP
    /// mappings expire 2 s after their last packet; A's packets are held back for 3 s at R,
    /// and R then maps A's port 4500 to 4600), while B's SAs' encapsulation is updated in place
    /// (`ip xfrm state update`), as an IKE daemon does when it learns of the new mapping.
    Rebind,
    /// As `Manual`, with the verifier's map of SA residuals (`SA_TRUST`) one slot small
    /// (`--sa-trust-slots 1`): B's SA and A's (under a catch-all) take turns in it, so every
    /// change of direction forgets the other's residual, which comes back from its NAT
    /// mapping's record at its next segment.
    Evicted,
    /// The shared-NAT topology (A and A2 behind R), 100 rounds drawn from a seed: streams from
    /// one host or both, rekeys, a host leaving and coming back with another address, new
    /// corruption shapes and rates; corruption on throughout (`soak.rs`).
    Soak,
    /// As `Manual`, after ten thousand other NAT-T SAs (and peers) were added to B while the
    /// daemon ran (`--max-peers 16384`, labels at their default cap).
    Scale,
}

#[derive(Clone, Copy, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each flag is an independent axis of the scenario matrix"
)]
pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) setup: Setup,
    pub(crate) cipher: Cipher,
    pub(crate) mode: Mode,
    pub(crate) encap: bool,
    pub(crate) nat: bool,
    pub(crate) corrupt: bool,
    pub(crate) corruption: Corruption,
    pub(crate) v6: bool,
}

impl Setup {
    /// SAs made by hand (`ip xfrm`), with the driver's encapsulation sockets.
    pub(crate) const fn manual_sas(self) -> bool {
        matches!(
            self,
            Self::Manual
                | Self::ManualRekey
                | Self::Sighup
                | Self::Undiscovered
                | Self::Evicted
                | Self::Rebind
        )
    }
}

impl Scenario {
    pub(crate) const fn addrs(&self) -> &'static Addrs {
        if self.v6 { &V6 } else { &V4 }
    }

    /// Bytes of the main stream (per sender).
    pub(crate) const fn stream_bytes(&self) -> u64 {
        match self.setup {
            // Long enough to be flowing still when the second daemon has adopted the verifier.
            Setup::Restart => RESTART_STREAM,
            // Every other packet dropped: TCP moves a segment per round trip or two, and each
            // lost retransmission waits for its timer.
            _ if matches!(self.corruption, Corruption::ConstantDelta { every: 2 })
                && matches!(self.mode, Mode::Enforce) =>
            {
                HALF_LOSS_STREAM
            }
            _ => STREAM,
        }
    }
}

pub(crate) const SCENARIOS: [Scenario; 35] = [
    Scenario {
        setup: Setup::Manual,
        name: "a-clean",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: false,
        corrupt: false,
        corruption: Corruption::Word,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "b-observe-null",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: false,
        corrupt: true,
        corruption: Corruption::Word,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "b-observe-cbc-aes",
        cipher: Cipher::CbcAes,
        mode: Mode::Observe,
        encap: true,
        nat: false,
        corrupt: true,
        corruption: Corruption::Word,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "b-enforce-cbc-aes",
        cipher: Cipher::CbcAes,
        mode: Mode::Enforce,
        encap: true,
        nat: false,
        corrupt: true,
        corruption: Corruption::Word,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "c-enforce",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: false,
        corrupt: true,
        corruption: Corruption::Word,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "d-nat-learned",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::Word,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "e-plain-esp",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: false,
        nat: false,
        corrupt: true,
        corruption: Corruption::Word,
        v6: false,
    },
    Scenario {
        setup: Setup::StrongSwan,
        name: "f-strongswan-nat",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::Word,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "h-ipv6-enforce",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: false,
        corrupt: true,
        corruption: Corruption::Word,
        v6: true,
    },
    Scenario {
        setup: Setup::SharedNat,
        name: "i-two-behind-one-nat",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::Word,
        v6: false,
    },
    Scenario {
        setup: Setup::Restart,
        name: "j-sigkill-restart",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::Word,
        v6: false,
    },
    Scenario {
        setup: Setup::Scale,
        name: "k-ten-thousand-sas",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: false,
        corrupt: true,
        corruption: Corruption::Word,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "l-constant-delta-enforce",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::ConstantDelta { every: 7 },
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "l-constant-delta-observe",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::ConstantDelta { every: 2 },
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "l-constant-delta-2-enforce",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::ConstantDelta { every: 2 },
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "l-constant-delta-7-observe",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::ConstantDelta { every: 7 },
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "l-constant-delta-100-enforce",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::ConstantDelta { every: 100 },
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "l-constant-delta-100-observe",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::ConstantDelta { every: 100 },
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "m-first-segment-nat",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::WordFromStart,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "m-first-segment-observe",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::WordFromStart,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "m-first-segment-plain-observe",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: false,
        corrupt: true,
        corruption: Corruption::WordFromStart,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "m-first-segment",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: false,
        corrupt: true,
        corruption: Corruption::WordFromStart,
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "n-bit-flip-enforce",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::BitFlip { every: 100 },
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "n-bit-flip-observe",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: false,
        corrupt: true,
        corruption: Corruption::BitFlip { every: 2 },
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "n-random-bit-flip-observe",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::RandomBitFlip { every: 10 },
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "n-zeroed-run-observe",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::ZeroRun { every: 1000 },
        v6: false,
    },
    Scenario {
        setup: Setup::ManualRekey,
        name: "o-rekey-enforce",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::ZeroRun { every: 7 },
        v6: false,
    },
    Scenario {
        setup: Setup::ManualRekey,
        name: "o-rekey-observe",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::ZeroRun { every: 7 },
        v6: false,
    },
    Scenario {
        setup: Setup::Sighup,
        name: "p-sighup-enforce",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::Word,
        v6: false,
    },
    Scenario {
        setup: Setup::Undiscovered,
        name: "q-undiscovered-netns",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::Word,
        v6: false,
    },
    Scenario {
        setup: Setup::Evicted,
        name: "r-lru-evicted-enforce",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::ZeroRun { every: 7 },
        v6: false,
    },
    Scenario {
        setup: Setup::Rebind,
        name: "s-nat-rebind-enforce",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::RandomBitFlip { every: 50 },
        v6: false,
    },
    Scenario {
        setup: Setup::Manual,
        name: "t-learning-flood-observe",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::Flood,
        v6: false,
    },
    Scenario {
        setup: Setup::Soak,
        name: "u-soak-enforce",
        cipher: Cipher::Null,
        mode: Mode::Enforce,
        encap: true,
        nat: true,
        corrupt: true,
        corruption: Corruption::Drawn,
        v6: false,
    },
    Scenario {
        setup: Setup::Gro,
        name: "g-gro",
        cipher: Cipher::Null,
        mode: Mode::Observe,
        encap: true,
        nat: false,
        corrupt: false,
        corruption: Corruption::Word,
        v6: false,
    },
];
