//! The addresses of the topology and the constants every scenario shares.

/// One address family's plan: A, R's two sides, B, and how nft and xfrm spell things.
pub(crate) struct Addrs {
    pub(crate) a: &'static str,
    pub(crate) r_a: &'static str,
    pub(crate) r_b: &'static str,
    pub(crate) b: &'static str,
    pub(crate) prefix: u8,
    pub(crate) host_prefix: u8,
    pub(crate) any: &'static str,
    pub(crate) nft_family: &'static str,
    pub(crate) saddr: &'static str,
    pub(crate) esp: &'static str,
    pub(crate) forwarding: &'static str,
}

pub(crate) const V4: Addrs = Addrs {
    a: "10.1.0.1",
    r_a: "10.1.0.2",
    r_b: "10.2.0.1",
    b: "10.2.0.2",
    prefix: 24,
    host_prefix: 32,
    any: "0.0.0.0",
    nft_family: "ip",
    saddr: "ip saddr",
    esp: "ip protocol esp",
    forwarding: "/proc/sys/net/ipv4/ip_forward",
};

pub(crate) const V6: Addrs = Addrs {
    a: "fd00:1::1",
    r_a: "fd00:1::2",
    r_b: "fd00:2::1",
    b: "fd00:2::2",
    prefix: 64,
    host_prefix: 128,
    any: "::",
    nft_family: "ip6",
    saddr: "ip6 saddr",
    esp: "meta l4proto esp",
    forwarding: "/proc/sys/net/ipv6/conf/all/forwarding",
};

impl Addrs {
    /// `addr:port` as a socket address.
    pub(crate) fn sock(addr: &str, port: u16) -> String {
        if addr.contains(':') {
            format!("[{addr}]:{port}")
        } else {
            format!("{addr}:{port}")
        }
    }
}

pub(crate) const METRICS: &str = "http://127.0.0.1:9874";
/// Bit offset into the ESP packet's transport header (UDP for NAT-T, ESP for plain ESP) of the
/// 32 bits the corruption rule overwrites: well inside the TCP payload, clear of the ESP
/// trailer, for the null cipher and for cbc(aes) alike. (nft payload offsets stop at byte 255
/// on 6.1: ERANGE beyond.)
pub(crate) const CORRUPT_BIT: u32 = 1600;
/// `RandomBitFlip`'s payload bytes, counted from the start of the UDP header like
/// `CORRUPT_BIT`: all inside the TCP payload (which starts at byte 48: UDP, ESP and TCP with
/// timestamps) and below nft's byte 255.
pub(crate) const RANDOM_FLIP_BYTES: [u32; 8] = [60, 83, 101, 130, 157, 181, 209, 241];
/// `Corruption::ZeroRun`: bytes the rule zeroes (a DMA fault's run), from `ZERO_RUN_BIT` on:
/// inside the TCP payload (from byte 48) and ending at byte 248, below nft's byte 255.
pub(crate) const ZERO_RUN_BYTES: u32 = 64;
/// Bit offset of the zeroed run, counted like `CORRUPT_BIT`: byte 184.
pub(crate) const ZERO_RUN_BIT: u32 = 1472;
/// The rule corrupts every Nth ESP packet longer than 1000 bytes from A.
pub(crate) const CORRUPT_EVERY: u32 = 40;
/// `Corruption::Flood`: KiB of packets corrupted before the flood stops, about 55 large ones:
/// all but one in 8 of the 64 KiB warm-up stream (so the SA learns the flood's residual and
/// keeps it through the warm-up), and the first few of the main stream.
pub(crate) const FLOOD_KBYTES: u32 = 80;
pub(crate) const STREAM: u64 = 3 << 20;
/// The stream of a scenario that drops every other packet in enforce mode.
pub(crate) const HALF_LOSS_STREAM: u64 = 96 << 10;
/// The restart scenario's stream: it must outlast a SIGKILL, a gap and a second start-up (under
/// TCG the second daemon's program load alone takes seconds on 5.10; 32 MiB once ended first).
pub(crate) const RESTART_STREAM: u64 = 96 << 20;
/// Where the restart scenario mounts a bpffs of its own: `ip netns exec` gives the daemon a
/// private mount namespace, so pins under its own `/sys/fs/bpf` would die with it.
pub(crate) const RESTART_BPFFS: &str = "/run/natt-pins";
/// TCP port that bypasses IPsec, and the UDP port plaintext datagrams go to.
pub(crate) const PLAINTEXT_PORT: u16 = 6000;
/// Plaintext UDP datagrams sent from A to B.
pub(crate) const PLAINTEXT_DATAGRAMS: u64 = 50;
pub(crate) const WARMUP: u64 = 64 << 10;

/// Second sender behind the NAT.
pub(crate) const A2: &str = "10.3.0.1";
pub(crate) const R_A2: &str = "10.3.0.2";

/// The null cipher and its empty key, for `xfrm_state`.
/// The SPI of the SA from A to B after `Topology::rekey_a_to_b` (before: 0x1001).
pub(crate) const REKEYED_SPI: &str = "0x1003";

pub(crate) const NULL_CIPHER: [&str; 2] = ["ecb(cipher_null)", ""];
