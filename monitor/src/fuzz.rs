//! Fuzzing of everything the daemon decodes from outside: ring-buffer records, XFRM netlink
//! messages, the configuration file, and HTTP requests to the metrics endpoint.
//!
//! Each target is a `check_*` function that must not panic on any input and must hold its
//! invariants on what it accepts. Two sources feed them on every `cargo test` (and so in CI,
//! bounded by the case counts below):
//! - proptest strategies, from raw bytes to inputs shaped enough to reach deep into the parser
//!   (a netlink header whose length is right, a TOML file made of the schema's own keys);
//! - the corpus in `monitor/fuzz-corpus/<target>/`: seeds and every input that once broke a
//!   target, as hex (binary targets) or text, one file per input. A failing proptest case is
//!   shrunk by proptest; add the shrunk input there so it runs forever after.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    sync::LazyLock,
    time::Duration,
};

use monitor_ebpf::{EVENT_PAYLOAD_LEN, LearningSample, MismatchEvent};
use proptest::{collection::vec, prelude::*};

use crate::{
    cli::Cli,
    config::resolve,
    events::{Learning, Mismatch},
    http,
    xfrm::{self, Sa},
};

/// The corpus files of `target`, each as bytes (`.hex` files are decoded).
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz-corpus")
        .join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            let raw = fs::read(&p).unwrap();
            let bytes = if p.extension().is_some_and(|x| x == "hex") {
                unhex(&String::from_utf8(raw).unwrap())
            } else {
                raw
            };
            (p, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "{} holds no corpus", dir.display());
    out
}

/// Hex digits to bytes; whitespace and `#` comments to the end of a line are ignored.
fn unhex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.bytes().filter(u8::is_ascii_hexdigit))
        .collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Ring-buffer records

/// A record of either ring decodes to a value the ABI allows, or to nothing.
fn check_record(bytes: &[u8]) {
    if let Some(m) = Mismatch::decode(bytes) {
        assert!(bytes.len() >= size_of::<MismatchEvent>());
        assert!(m.payload.len() <= EVENT_PAYLOAD_LEN);
        assert!(matches!(m.proto, "tcp" | "udp" | "icmp" | "sctp"), "{m:?}");
        assert_eq!(m.src.is_ipv4(), m.dst.is_ipv4());
        let _ = m.flow();
    }
    if let Some(l) = Learning::decode(bytes) {
        assert!(bytes.len() >= size_of::<LearningSample>());
        let _ = l.encap_ports();
    }
}

// ---------------------------------------------------------------------------------------------
// XFRM netlink

/// A datagram from the XFRM socket splits into messages or is refused; every SA it carries
/// converts without panicking.
fn check_netlink(bytes: &[u8]) {
    if let Ok(messages) = xfrm::messages(bytes) {
        for m in messages {
            if let xfrm::DumpItem::Sa(sa) = m
                && let Some(sa) = Sa::from_message(&sa)
            {
                let _ = sa.skips_checksums();
            }
        }
    }
}

/// A netlink message header with a consistent length, of an XFRM or control type, then
/// `payload`: shaped so the deserializer gets past the length check.
fn netlink_message(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(16 + payload.len()).unwrap();
    let mut m = Vec::with_capacity(16 + payload.len());
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes()); // flags
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id
    m.extend_from_slice(payload);
    m
}

// ---------------------------------------------------------------------------------------------
// The configuration file

/// Every key of the configuration file's schema, and of a `[[peer]]` entry.
const FILE_KEYS: [&str; 11] = [
    "cgroup",
    "mode",
    "discover",
    "scope",
    "sys_path",
    "proc_path",
    "capture",
    "capture_max_bytes",
    "listen",
    "log_format",
    "bogus",
];
const PEER_KEYS: [&str; 7] = [
    "cidr",
    "mode",
    "original_src",
    "original_dst",
    "observed_dst",
    "learn_residual",
    "bogus",
];

/// A configuration file is resolved into settings or refused with an error that names the
/// file; it never panics.
fn check_config(text: &[u8]) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("natt-fuzz-config-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{n}.toml"));
    fs::write(&path, text).unwrap();
    let cli = <Cli as clap::Parser>::try_parse_from([
        "natt-monitor",
        "run",
        "--config",
        path.to_str().unwrap(),
    ])
    .unwrap();
    let crate::cli::Command::Run(args) = cli.command else {
        unreachable!("parsed a run command");
    };
    if let Err(e) = resolve(&args) {
        assert_ne!(e.to_string(), "", "an error says what is wrong");
    }
    let _ = fs::remove_file(&path);
}

/// A TOML value of some type, valid for some keys and wrong for others.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<bool>().prop_map(|v| v.to_string()),
        "[ -~]{0,24}".prop_map(|s| format!("{s:?}")),
        prop_oneof![
            Just("\"observe\""),
            Just("\"enforce\""),
            Just("\"192.0.2.1\""),
            Just("\"2001:db8::/64\""),
            Just("\"127.0.0.1:0\""),
            Just("\"/\""),
            Just("\"xfrm\""),
            Just("\"sa\""),
            Just("\"json\""),
            Just("[1, \"a\"]"),
            Just("{ x = 1 }"),
        ]
        .prop_map(str::to_owned),
    ]
}

/// A configuration file made of the schema's keys (and a bogus one) with values of every type,
/// top-level and in `[[peer]]` entries, sometimes cut short.
fn toml_file() -> impl Strategy<Value = Vec<u8>> {
    let line = (prop::sample::select(&FILE_KEYS[..]), toml_value())
        .prop_map(|(k, v)| format!("{k} = {v}\n"));
    let peer_line = (prop::sample::select(&PEER_KEYS[..]), toml_value())
        .prop_map(|(k, v)| format!("{k} = {v}\n"));
    let peer = vec(peer_line, 0..4).prop_map(|ls| format!("[[peer]]\n{}", ls.concat()));
    (
        vec(line, 0..6),
        vec(peer, 0..3),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(top, peers, cut)| {
            let text = format!("{}{}", top.concat(), peers.concat()).into_bytes();
            // Now and then the file is cut mid-line.
            let keep = if cut.index(8) == 0 {
                cut.index(text.len() + 1)
            } else {
                text.len()
            };
            text[..keep].to_vec()
        })
}

// ---------------------------------------------------------------------------------------------
// The metrics endpoint

/// One endpoint for every HTTP case.
static ENDPOINT: LazyLock<std::net::SocketAddr> = LazyLock::new(http::testing::start);

/// Sends `request` as one connection's bytes and reads what comes back (bounded by a timeout).
/// With `end`, the client then closes its side, as a client that sent all it had does; hyper
/// then answers only what it could already judge.
fn exchange(request: &[u8], end: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(*ENDPOINT).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A large request may be refused before it is all written.
    let _ = s.write_all(request);
    if end {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let _ = s.take(1 << 20).read_to_end(&mut out);
    out
}

/// Whatever a client sends, the answer is a well-formed HTTP status (or the connection is
/// closed), and the next scrape is answered.
fn check_http(request: &[u8]) {
    let reply = exchange(request, true);
    if !reply.is_empty() {
        assert!(
            reply.starts_with(b"HTTP/1.1 ") || reply.starts_with(b"HTTP/1.0 "),
            "{:?}",
            String::from_utf8_lossy(&reply)
        );
    }
    let scrape = exchange(
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        false,
    );
    let scrape = String::from_utf8_lossy(&scrape);
    assert!(
        scrape.starts_with("HTTP/1.1 200 ") && scrape.ends_with(http::testing::BODY),
        "{scrape}"
    );
}

/// An HTTP/1 request with a method, path and headers drawn from odd but plausible values.
fn http_request() -> impl Strategy<Value = Vec<u8>> {
    let method = prop::sample::select(&["GET", "HEAD", "POST", "DELETE", "get", "", "GET GET"][..]);
    let path = prop_oneof![
        Just("/metrics".to_owned()),
        Just("/healthz".to_owned()),
        Just("/".to_owned()),
        "/[ -~]{0,40}",
        "[\\x00-\\xff]{0,20}",
    ];
    let version = prop::sample::select(&["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/9.9", ""][..]);
    let header = ("[A-Za-z-]{0,12}", "[ -~]{0,30}").prop_map(|(k, v)| format!("{k}: {v}\r\n"));
    (method, path, version, vec(header, 0..6), any::<bool>()).prop_map(
        |(m, p, v, headers, finished)| {
            let mut r = format!("{m} {p} {v}\r\n{}", headers.concat());
            if finished {
                r.push_str("\r\n");
            }
            r.into_bytes()
        },
    )
}

// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn records_of_any_bytes_decode_or_are_refused(bytes in vec(any::<u8>(), 0..160)) {
        check_record(&bytes);
    }

    #[test]
    fn netlink_datagrams_of_any_bytes_split_or_are_refused(bytes in vec(any::<u8>(), 0..200)) {
        check_netlink(&bytes);
    }

    #[test]
    fn netlink_messages_with_a_right_length_decode_or_are_refused(
        kind in prop::sample::select(&[2u16, 3, 16, 17, 18, 19, 20, 24, 25, 28][..]),
        payload in vec(any::<u8>(), 0..400),
        twice in any::<bool>(),
    ) {
        let mut m = netlink_message(kind, &payload);
        if twice {
            let again = m.clone();
            m.resize((m.len() + 3) & !3, 0);
            m.extend_from_slice(&again);
        }
        check_netlink(&m);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn configuration_files_resolve_or_are_refused(text in toml_file()) {
        check_config(&text);
    }

    #[test]
    fn configuration_files_of_any_bytes_are_refused_cleanly(text in vec(any::<u8>(), 0..120)) {
        check_config(&text);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_endpoint_answers_any_request_and_keeps_scraping(request in http_request()) {
        check_http(&request);
    }

    #[test]
    fn the_endpoint_survives_any_bytes(request in vec(any::<u8>(), 0..300)) {
        check_http(&request);
    }
}

#[test]
fn the_corpus_passes_every_target() {
    for (path, bytes) in corpus("records") {
        eprintln!("records: {}", path.display());
        check_record(&bytes);
    }
    for (path, bytes) in corpus("netlink") {
        eprintln!("netlink: {}", path.display());
        check_netlink(&bytes);
    }
    for (path, bytes) in corpus("config") {
        eprintln!("config: {}", path.display());
        check_config(&bytes);
    }
    for (path, bytes) in corpus("http") {
        eprintln!("http: {}", path.display());
        check_http(&bytes);
    }
}

/// Hex text for a corpus file: a comment line, then 32 bytes a line.
fn hex(bytes: &[u8], comment: &str) -> String {
    use std::fmt::Write as _;
    let mut s = format!("# {comment}\n");
    for line in bytes.chunks(32) {
        for b in line {
            let _ = write!(s, "{b:02x}");
        }
        s.push('\n');
    }
    s
}

/// Writes one generated corpus file.
fn write_seed(target: &str, name: &str, text: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz-corpus")
        .join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), text).unwrap();
}

/// Writes the generated seeds of `fuzz-corpus/` (ring records and netlink messages, built from
/// the ABI and netlink-packet-xfrm's own types) after an ABI change:
/// `cargo test -p natt-monitor fuzz::write_seeds -- --ignored`.
#[test]
#[ignore = "regenerates corpus files"]
fn write_seeds() {
    write_record_seeds();
    write_netlink_seeds();
}

fn write_record_seeds() {
    use monitor_ebpf::Family;

    use crate::events::samples::{bytes_of, learning, mismatch};

    let ev = mismatch();
    write_seed(
        "records",
        "mismatch-v4.hex",
        &hex(&bytes_of(&ev), "an IPv4 mismatch event"),
    );
    let whole = bytes_of(&ev);
    write_seed(
        "records",
        "mismatch-cut.hex",
        &hex(&whole[..whole.len() - 1], "one byte short"),
    );
    let mut v6 = ev;
    v6.family = Family::V6 as u8;
    v6.src = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    v6.payload_len = 255;
    write_seed(
        "records",
        "mismatch-v6-long-payload-len.hex",
        &hex(&bytes_of(&v6), "IPv6, payload_len past the payload"),
    );
    let mut bad = ev;
    bad.proto = 1;
    write_seed(
        "records",
        "mismatch-icmp.hex",
        &hex(&bytes_of(&bad), "a protocol no program writes"),
    );
    let sample = learning();
    write_seed(
        "records",
        "learning-v4.hex",
        &hex(&bytes_of(&sample), "a learning sample"),
    );
}

fn write_netlink_seeds() {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_xfrm::{XfrmAttrs, XfrmMessage, nlas::EncapTmpl, state::ModifyMessage};

    let mut sa = ModifyMessage::default();
    sa.user_sa_info.family = u16::try_from(libc::AF_INET).unwrap();
    sa.user_sa_info.saddr.addr[..4].copy_from_slice(&[203, 0, 113, 9]);
    sa.user_sa_info.id.daddr.addr[..4].copy_from_slice(&[192, 0, 2, 2]);
    sa.user_sa_info.id.spi = 0xc1c2_c3c4;
    sa.user_sa_info.id.proto = 50;
    sa.nlas.push(XfrmAttrs::EncapsulationTemplate(EncapTmpl {
        encap_type: 2,
        encap_sport: 4500,
        encap_dport: 4500,
        ..EncapTmpl::default()
    }));
    let mut m = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::InnerMessage(XfrmMessage::AddSa(sa)),
    );
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    write_seed(
        "netlink",
        "newsa-espinudp.hex",
        &hex(&buf, "XFRM_MSG_NEWSA, transport, ESP in UDP"),
    );
    let mut two = buf.clone();
    two.extend_from_slice(&buf);
    write_seed(
        "netlink",
        "two-newsa.hex",
        &hex(&two, "two messages in one datagram"),
    );
    write_seed(
        "netlink",
        "cut.hex",
        &hex(&buf[..buf.len() / 2], "a message cut in half"),
    );
    let mut lying = buf.clone();
    lying[..4].copy_from_slice(&(u32::try_from(buf.len()).unwrap() + 64).to_ne_bytes());
    write_seed(
        "netlink",
        "length-past-end.hex",
        &hex(&lying, "a length past the datagram"),
    );
    write_seed(
        "netlink",
        "done.hex",
        &hex(&netlink_message(3, &0i32.to_ne_bytes()), "NLMSG_DONE"),
    );
}
