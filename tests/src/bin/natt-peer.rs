//! Test helper: one end of a TCP stream inside a network namespace.
//!
//! `natt-peer recv --netns NS --cgroup DIR --listen ADDR --bytes N` joins the cgroup *before*
//! creating its socket (accepted sockets inherit the listener's cgroup), enters the netns,
//! prints `READY`, accepts one connection, reads N bytes and prints
//! `received=<n> differing=<k> invisible=<r> invisible_bytes=<b>` against the deterministic
//! pattern: `r` runs of differing bytes (`b` bytes) that left the one's-complement sum
//! unchanged, which no TCP or UDP checksum can tell from intact data.
//!
//! `natt-peer send --netns NS --connect ADDR --bytes N` writes the pattern; with
//! `--seconds S` instead of `--bytes` it writes for that long. `recv --bytes 0` reads to EOF.
//! With `--sctp` on both ends the stream is an SCTP association (one-to-one style sockets,
//! which read and write like TCP) instead of a TCP connection.
//! With `--fill B` on both ends the stream is the byte B repeated instead of the pattern:
//! repetitive data, on which a byte set at a fixed offset shifts every checksum alike.
//!
//! `natt-peer ping --netns NS --cgroup DIR --to ADDR --count N --size S` joins the cgroup,
//! enters the netns and sends N ICMP (or, to an IPv6 ADDR, `ICMPv6`) echo requests of S
//! pattern bytes from a raw socket, one at a time, each waiting up to 300 ms for its reply;
//! it prints
//! `sent=<n> intact=<i> corrupted=<c> lost=<l>` (a reply whose payload differs is corrupted,
//! one that never came is lost).
//!
//! Every socket, the listener's accept included, has a 30 s timeout so a broken test fails
//! instead of hanging.

#![expect(
    clippy::print_stdout,
    reason = "stdout is this helper's protocol with the test"
)]

use std::{
    fs::{self, File},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::ExitCode,
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(30);

/// The stream's byte at offset `i`: the pattern, or the `--fill` byte.
fn pattern(fill: Option<u8>, i: u64) -> u8 {
    fill.unwrap_or((i.wrapping_mul(131) ^ (i >> 11) ^ (i >> 19)) as u8)
}

/// `--fill B`, if given.
fn fill(args: &[String]) -> Result<Option<u8>, String> {
    arg(args, "--fill")
        .ok()
        .map(|v| v.parse().map_err(|e| format!("--fill {v}: {e}")))
        .transpose()
}

fn enter_netns(name: &str) -> Result<(), String> {
    let f = File::open(format!("/run/netns/{name}"))
        .map_err(|e| format!("opening netns {name}: {e}"))?;
    // SAFETY: valid fd; CLONE_NEWNET only switches this (single-threaded) process's netns.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {name}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn arg(args: &[String], name: &str) -> Result<String, String> {
    args.windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].clone())
        .ok_or_else(|| format!("missing {name}"))
}

/// Accepts one connection within `TIMEOUT`: a sender that never connects (its SYN dropped, its
/// connect timed out) makes the receiver fail too, instead of waiting in `accept` for ever.
fn accept(listener: &TcpListener) -> Result<TcpStream, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    return Err(format!("accept: no connection within {TIMEOUT:?}"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

/// Whether `--sctp` was given.
fn sctp(args: &[String]) -> bool {
    args.iter().any(|a| a == "--sctp")
}

/// An SCTP socket of the one-to-one style (RFC 6458, section 4): once listening or connected
/// it reads and writes like a TCP stream, so std's stream types carry it.
fn sctp_socket(addr: &SocketAddr) -> Result<OwnedFd, String> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_SCTP,
        )
    };
    if fd < 0 {
        return Err(format!(
            "SCTP socket: {} (is the sctp module loaded?)",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a descriptor socket(2) just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `r`, a libc call's return value, or the error it left, for `what`.
fn checked(r: libc::c_int, what: &str) -> Result<(), String> {
    if r < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets the `SOL_SOCKET` option `opt` (named `what`) of `fd` to `value`.
fn set_option<T>(fd: &OwnedFd, opt: libc::c_int, value: &T, what: &str) -> Result<(), String> {
    // SAFETY: valid descriptor, and an option value of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    checked(r, what)
}

/// An SCTP listener on `addr`.
fn sctp_listen(addr: &SocketAddr) -> Result<TcpListener, String> {
    let fd = sctp_socket(addr)?;
    set_option(&fd, libc::SO_REUSEADDR, &1 as &libc::c_int, "SO_REUSEADDR")?;
    let (sa, len) = sockaddr_port(*addr);
    // SAFETY: valid descriptor, and a socket address of the given size.
    unsafe {
        checked(
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sa).cast(),
                len as libc::socklen_t,
            ),
            &format!("bind {addr}"),
        )?;
        checked(libc::listen(fd.as_raw_fd(), 1), "listen")?;
    }
    Ok(TcpListener::from(fd))
}

/// An SCTP association to `addr`, set up within `TIMEOUT`.
fn sctp_connect(addr: &SocketAddr) -> Result<TcpStream, String> {
    let fd = sctp_socket(addr)?;
    let tv = libc::timeval {
        tv_sec: TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // connect(2) waits at most the send timeout.
    set_option(&fd, libc::SO_SNDTIMEO, &tv, "SO_SNDTIMEO")?;
    let (sa, len) = sockaddr_port(*addr);
    // SAFETY: valid descriptor, and a socket address of the given size.
    unsafe {
        checked(
            libc::connect(
                fd.as_raw_fd(),
                (&raw const sa).cast(),
                len as libc::socklen_t,
            ),
            &format!("connect {addr}"),
        )?;
    }
    Ok(TcpStream::from(fd))
}

fn recv(args: &[String]) -> Result<(), String> {
    join(args)?;
    let addr: SocketAddr = arg(args, "--listen")?
        .parse()
        .map_err(|e| format!("--listen: {e}"))?;
    let want: u64 = arg(args, "--bytes")?
        .parse()
        .map_err(|e| format!("--bytes: {e}"))?;
    let fill = fill(args)?;
    let listener = if sctp(args) {
        sctp_listen(&addr)?
    } else {
        TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?
    };
    println!("READY");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut s = accept(&listener)?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    let mut damage = Damage::default();
    while want == 0 || got < want {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("read after {got} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            let at = got + i as u64;
            damage.byte(at, *b, pattern(fill, at));
        }
        got += n as u64;
    }
    damage.close();
    println!(
        "received={got} differing={} invisible={} invisible_bytes={}",
        damage.differing, damage.invisible, damage.invisible_bytes
    );
    Ok(())
}

/// Differing bytes closer than this to the previous one belong to the same corruption: one
/// segment's (a garbled cipher block and the word it flips in the next are 32 bytes at most).
const RUN_GAP: u64 = 64;

/// The bytes a receiver saw differ from the pattern, grouped into runs (one per corruption),
/// and which runs no checksum of 16-bit one's-complement words could have seen: those whose
/// received bytes sum to what the sent ones sum to. Random corruption leaves about 1 run in
/// 65,535 so, and neither the kernel nor natt-monitor can tell such a segment from an intact
/// one; the tests account for each such run instead of failing on it.
#[derive(Default)]
struct Damage {
    /// Bytes that differ.
    differing: u64,
    /// Runs whose sum is unchanged, and their differing bytes.
    invisible: u64,
    invisible_bytes: u64,
    /// The open run: its last differing offset, its differing bytes, and the sum of
    /// (received - sent) over its words, modulo 65,535.
    run: Option<(u64, u64, u64)>,
}

impl Damage {
    /// Byte `at` of the stream arrived as `got`, was sent as `sent`.
    fn byte(&mut self, at: u64, got: u8, sent: u8) {
        if let Some((last, _, _)) = self.run
            && at > last + RUN_GAP
        {
            self.close();
        }
        if got == sent {
            return;
        }
        self.differing += 1;
        // Even offsets are the high byte of a word, odd ones the low: the same byte positions
        // the segment's checksum sums them in, up to a swap of the two, which leaves a zero
        // difference zero.
        let shift = if at.is_multiple_of(2) { 8 } else { 0 };
        let delta = (u64::from(got) << shift) + 65_535 - (u64::from(sent) << shift);
        let (_, bytes, sum) = self.run.unwrap_or_default();
        self.run = Some((at, bytes + 1, (sum + delta) % 65_535));
    }

    /// Ends the open run.
    fn close(&mut self) {
        if let Some((_, bytes, 0)) = self.run.take() {
            self.invisible += 1;
            self.invisible_bytes += bytes;
        }
    }
}

fn send(args: &[String]) -> Result<(), String> {
    enter_netns(&arg(args, "--netns")?)?;
    let fill = fill(args)?;
    let addr: SocketAddr = arg(args, "--connect")?
        .parse()
        .map_err(|e| format!("--connect: {e}"))?;
    let (total, until) = match arg(args, "--seconds") {
        Ok(s) => {
            let secs: u64 = s.parse().map_err(|e| format!("--seconds: {e}"))?;
            (
                u64::MAX,
                Some(std::time::Instant::now() + Duration::from_secs(secs)),
            )
        }
        Err(_) => (
            arg(args, "--bytes")?
                .parse()
                .map_err(|e| format!("--bytes: {e}"))?,
            None,
        ),
    };
    let mut s = if sctp(args) {
        sctp_connect(&addr)?
    } else {
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?
    };
    s.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut off = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    while off < total && until.is_none_or(|t| std::time::Instant::now() < t) {
        let n = (total - off).min(buf.len() as u64) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(fill, off + i as u64);
        }
        s.write_all(&buf[..n])
            .map_err(|e| format!("write at {off}: {e}"))?;
        off += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    // Wait for the receiver to close, so every byte was read before we exit.
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let _ = s.read(&mut [0u8; 1]);
    Ok(())
}

/// Joins `--cgroup` (before any socket exists) and enters `--netns`.
fn join(args: &[String]) -> Result<(), String> {
    let cgroup = arg(args, "--cgroup")?;
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    fs::write(format!("{cgroup}/cgroup.procs"), pid.to_string())
        .map_err(|e| format!("joining cgroup {cgroup}: {e}"))?;
    enter_netns(&arg(args, "--netns")?)
}

/// The Internet checksum of `data`.
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `to` as a socket address for sendto(2), and its length.
fn sockaddr(to: std::net::IpAddr) -> (libc::sockaddr_storage, usize) {
    sockaddr_port(SocketAddr::new(to, 0))
}

/// `to` with its port as a socket address for bind(2) or connect(2), and its length.
fn sockaddr_port(to: SocketAddr) -> (libc::sockaddr_storage, usize) {
    let port = to.port().to_be();
    let to = to.ip();
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut dest: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match to {
        std::net::IpAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut dest).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        std::net::IpAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: port,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut dest).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (dest, len)
}

fn ping(args: &[String]) -> Result<(), String> {
    join(args)?;
    let to: std::net::IpAddr = arg(args, "--to")?
        .parse()
        .map_err(|e| format!("--to: {e}"))?;
    let count: u16 = arg(args, "--count")?
        .parse()
        .map_err(|e| format!("--count: {e}"))?;
    let size: usize = arg(args, "--size")?
        .parse()
        .map_err(|e| format!("--size: {e}"))?;
    let (family, proto) = if to.is_ipv4() {
        (libc::AF_INET, libc::IPPROTO_ICMP)
    } else {
        (libc::AF_INET6, libc::IPPROTO_ICMPV6)
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW, proto) };
    if fd < 0 {
        return Err(format!(
            "raw ICMP socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a fresh fd this function owns from here on.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 300_000,
    };
    // SAFETY: valid fd, option and length.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let (dest, dest_len) = sockaddr(to);
    // ICMP's echo request and reply types; the kernel sums an ICMPv6 raw socket's messages
    // itself (the pseudo-header is its to know), so only ICMP's are summed here.
    let (request, reply) = if to.is_ipv4() { (8, 0) } else { (128, 129) };
    // SAFETY: getpid has no preconditions.
    let id = (unsafe { libc::getpid() }.cast_unsigned() as u16).to_be_bytes();
    let (mut intact, mut corrupted, mut lost) = (0u32, 0u32, 0u32);
    let mut buf = vec![0u8; 65536];
    for seq in 0..count {
        let data: Vec<u8> = (0..size)
            .map(|i| pattern(None, u64::from(seq) * size as u64 + i as u64))
            .collect();
        let s = seq.to_be_bytes();
        let mut msg = [request, 0, 0, 0, id[0], id[1], s[0], s[1]].to_vec();
        msg.extend_from_slice(&data);
        if to.is_ipv4() {
            let c = inet_checksum(&msg).to_be_bytes();
            msg[2..4].copy_from_slice(&c);
        }
        // SAFETY: valid fd, buffer and address.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const dest).cast(),
                dest_len as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(format!("sendto: {}", std::io::Error::last_os_error()));
        }
        loop {
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                lost += 1;
                break;
            }
            let pkt = &buf[..n.cast_unsigned()];
            // An IPv4 raw socket receives the IP header too; an IPv6 one the message alone.
            let ihl = if to.is_ipv4() {
                usize::from(pkt[0] & 0x0f) * 4
            } else {
                0
            };
            let icmp = &pkt[ihl.min(pkt.len())..];
            // An echo reply with our identifier and this sequence number; anything else (an
            // earlier reply that came late, neighbour discovery) is not this request's.
            if icmp.len() >= 8 && icmp[0] == reply && icmp[4..6] == id && icmp[6..8] == s {
                if icmp[8..] == data[..] {
                    intact += 1;
                } else {
                    corrupted += 1;
                }
                break;
            }
        }
    }
    println!("sent={count} intact={intact} corrupted={corrupted} lost={lost}");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("recv") => recv(&args),
        Some("send") => send(&args),
        Some("ping") => ping(&args),
        _ => Err("usage: natt-peer recv|send|ping ...".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("natt-peer: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Damage;

    /// Runs `Damage` over 4 KiB of zeros received as `changed` says.
    fn damage(changed: &[(u64, u8)]) -> (u64, u64, u64) {
        let mut d = Damage::default();
        for at in 0..4096 {
            let got = changed
                .iter()
                .find(|(a, _)| *a == at)
                .map_or(0, |(_, b)| *b);
            d.byte(at, got, 0);
        }
        d.close();
        (d.differing, d.invisible, d.invisible_bytes)
    }

    #[test]
    fn a_change_the_sum_sees_is_visible() {
        assert_eq!(damage(&[(100, 0x40)]), (1, 0, 0));
        // The same amount added to a high and a low byte: different words of the sum.
        assert_eq!(damage(&[(100, 1), (103, 1)]), (2, 0, 0));
    }

    #[test]
    fn changes_that_cancel_in_the_sum_are_invisible() {
        // +1 and -1 on two high bytes.
        let mut d = Damage::default();
        for (at, got, sent) in [(10, 5, 4), (11, 9, 9), (12, 3, 4)] {
            d.byte(at, got, sent);
        }
        d.close();
        assert_eq!((d.differing, d.invisible, d.invisible_bytes), (2, 1, 2));
        // 0x0000 received as 0xffff: one's-complement zero either way.
        assert_eq!(damage(&[(200, 0xff), (201, 0xff)]), (2, 1, 2));
        // The same word at an odd offset: a byte swap of the sum, still zero.
        assert_eq!(damage(&[(301, 0xff), (302, 0xff)]), (2, 1, 2));
    }

    #[test]
    fn runs_further_apart_than_the_gap_are_judged_apart() {
        // Each run alone changes the sum; together they would cancel.
        let mut d = Damage::default();
        for (at, got, sent) in [(0, 5, 4), (1000, 3, 4)] {
            d.byte(at, got, sent);
        }
        d.close();
        assert_eq!((d.differing, d.invisible), (2, 0));
        // Within the gap they are one run, which cancels.
        let mut d = Damage::default();
        for (at, got, sent) in [(0, 5, 4), (40, 3, 4)] {
            d.byte(at, got, sent);
        }
        d.close();
        assert_eq!((d.differing, d.invisible), (2, 1));
    }
}
