//! Network namespace, veth, cgroup, injector and process guards for end-to-end tests.
//!
//! Every resource is owned by a guard whose `Drop` removes it, so a failing assertion (a
//! panic) still deletes namespaces, cgroups and child processes.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, tc},
};
use monitor_ebpf::InjectSlot;
use natt_monitor::ebpf::TESTBED_OBJ;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short name for this process and call.
#[must_use]
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    /// Name under /run/netns.
    pub name: String,
}

impl Netns {
    /// Creates a namespace with loopback up.
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// The initial network namespace (PID 1's) under a name of its own (`ip netns attach`), for
    /// code that takes a `Netns`: dropping it removes only the name.
    #[must_use]
    pub fn initial(prefix: &str) -> Self {
        let name = unique(prefix);
        sh(&["ip", "netns", "attach", &name, "1"]);
        Self { name }
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = fs::File::open(format!("/run/netns/{}", self.name)).expect("open netns");
                // SAFETY: valid fd; only this helper thread changes namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "setns {}: {}",
                    self.name,
                    std::io::Error::last_os_error()
                );
                f()
            })
            .join()
            .expect("netns thread")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Sender namespace A and receiver namespace B joined by a veth pair, set up the way the
/// NAT-T emulation needs it: sender tx checksum offload off (complete checksums on the wire),
/// receiver GRO off (one skb per segment).
#[derive(Debug)]
pub struct Lab {
    /// Sender side.
    pub a: Netns,
    /// Receiver side.
    pub b: Netns,
    /// Interface name in B.
    pub dev_b: &'static str,
}

/// Sender's IPv4 address inside the lab (a documentation prefix, only inside our netns).
pub const ADDR_A: &str = "192.0.2.1";
/// Receiver's IPv4 address.
pub const ADDR_B: &str = "192.0.2.2";
/// Sender's IPv6 address.
pub const ADDR6_A: &str = "2001:db8:77::1";
/// Receiver's IPv6 address.
pub const ADDR6_B: &str = "2001:db8:77::2";

impl Lab {
    /// Builds the lab with the given MTU on both ends, the sender's tx checksum offload off (so
    /// checksums on the wire are complete, as after ESP decapsulation) and the receiver's GRO
    /// off (so no aggregate hides a segment).
    #[must_use]
    pub fn new(mtu: u32) -> Self {
        let lab = Self::with_default_offloads(mtu);
        sh(&[
            "ip",
            "netns",
            "exec",
            &lab.a.name,
            "ethtool",
            "-K",
            "va",
            "tx",
            "off",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &lab.b.name,
            "ethtool",
            "-K",
            "vb",
            "gro",
            "off",
        ]);
        lab
    }

    /// The lab with every offload as the kernel sets it for veth: tx checksum offload on, so
    /// segments reach the receiver `CHECKSUM_PARTIAL`, with only the pseudo-header sum in the
    /// checksum field (containers and co-located VMs look like this).
    #[must_use]
    pub fn with_default_offloads(mtu: u32) -> Self {
        let a = Netns::new("natta");
        let b = Netns::new("nattb");
        let lab = Self { a, b, dev_b: "vb" };
        let mtu = mtu.to_string();
        sh(&[
            "ip",
            "-n",
            &lab.a.name,
            "link",
            "add",
            "va",
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            "vb",
            "netns",
            &lab.b.name,
            "mtu",
            &mtu,
        ]);
        for (ns, dev, v4, v6) in [
            (&lab.a, "va", ADDR_A, ADDR6_A),
            (&lab.b, "vb", ADDR_B, ADDR6_B),
        ] {
            sh(&[
                "ip",
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                dev,
            ]);
            sh(&[
                "ip",
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            sh(&["ip", "-n", &ns.name, "link", "set", dev, "up"]);
            sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        }
        lab
    }

    /// Makes each end's IPv6 neighbour entry for the other permanent, so that no neighbour
    /// discovery flows between their global addresses (a test that counts every `ICMPv6`
    /// message from one of them counts only its own).
    pub fn static_neighbours(&self) {
        for (ns, dev, other, other_dev, addr) in [
            (&self.a, "va", &self.b, "vb", ADDR6_B),
            (&self.b, "vb", &self.a, "va", ADDR6_A),
        ] {
            let path = format!("/sys/class/net/{other_dev}/address");
            let out = Command::new("ip")
                .args(["netns", "exec", &other.name, "cat", &path])
                .output()
                .unwrap_or_else(|e| panic!("reading {path} in {}: {e}", other.name));
            let mac = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            assert!(out.status.success() && !mac.is_empty(), "{path}: {out:?}");
            sh(&[
                "ip",
                "-n",
                &ns.name,
                "-6",
                "neigh",
                "replace",
                addr,
                "lladdr",
                &mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
    }
}

/// A child cgroup of the cgroup2 mount; on drop, its processes are killed and it is removed.
#[derive(Debug)]
pub struct Cgroup {
    /// Its directory.
    pub path: PathBuf,
}

impl Cgroup {
    /// Creates it.
    #[must_use]
    pub fn new() -> Self {
        let root = natt_monitor::cgroup::cgroup2_mount().expect("cgroup2 mount");
        let path = root.join(unique("natt-test-"));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let procs = fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            let pids: Vec<i32> = procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            for pid in &pids {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
            if fs::remove_dir(&self.path).is_ok() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    what: String,
}

impl Proc {
    /// Spawns with piped stdout.
    #[must_use]
    pub fn spawn(what: &str, cmd: &mut Command) -> Self {
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        Self {
            child: Some(child),
            what: what.to_owned(),
        }
    }

    /// Reads stdout lines until one equals `line` (or the process exits).
    pub fn wait_for_line(&mut self, line: &str) {
        let child = self.child.as_mut().expect("running");
        let out = child.stdout.as_mut().expect("piped");
        let mut r = BufReader::new(out);
        let mut s = String::new();
        loop {
            s.clear();
            let n = r.read_line(&mut s).expect("read child stdout");
            if n == 0 {
                drop(r);
                panic!(
                    "{} exited before printing {line}: {}",
                    self.what,
                    Self::stderr_now(child)
                );
            }
            if s.trim() == line {
                return;
            }
        }
    }

    fn stderr_now(child: &mut Child) -> String {
        let _ = child.kill();
        let out = child.stderr.take().map(|mut e| {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
            s
        });
        out.unwrap_or_default()
    }

    /// Waits up to `timeout` for exit; panics with its stderr on failure or time-out.
    /// Returns its stdout.
    #[must_use]
    pub fn finish(mut self, timeout: Duration) -> String {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                let out = child.wait_with_output().expect("output");
                assert!(
                    status.success(),
                    "{} failed ({status}): {}",
                    self.what,
                    String::from_utf8_lossy(&out.stderr)
                );
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "{} did not finish within {timeout:?}: {}",
                    self.what,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What the injector did, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjectStats {
    /// Segments marked `CHECKSUM_UNNECESSARY`.
    pub marked: u64,
    /// TCP segments carrying payload.
    pub data_segments: u64,
    /// Segments whose payload byte was flipped.
    pub corrupted: u64,
    /// Largest L4 length seen.
    pub max_l4_len: u64,
    /// ICMP messages carrying payload.
    pub icmp_messages: u64,
    /// ICMP messages whose payload byte was flipped.
    pub icmp_corrupted: u64,
}

/// The NAT-T emulating injector attached at tc ingress of the receiver's veth. Dropping it
/// detaches it (TCX/netlink link owned by the loaded object).
pub struct Injector {
    bpf: Ebpf,
}

impl Injector {
    /// Loads and attaches to `dev` inside `ns`; corrupts every `every`th data segment and ICMP
    /// message (0: none).
    #[must_use]
    pub fn attach(ns: &Netns, dev: &str, every: u32) -> Self {
        Self::with_shape(ns, dev, every, 0)
    }

    /// As `attach`, but the corruption of every `every`th TCP data segment swaps two adjacent
    /// 16-bit words of its payload: one that leaves the checksum's sum unchanged.
    #[must_use]
    pub fn attach_swapping(ns: &Netns, dev: &str, every: u32) -> Self {
        Self::with_shape(ns, dev, every, 1)
    }

    fn with_shape(ns: &Netns, dev: &str, every: u32, swap: u32) -> Self {
        let bpf = ns.enter(|| {
            let mut bpf = EbpfLoader::new()
                .override_global("CORRUPT_EVERY", &every, true)
                .override_global("SWAP_WORDS", &swap, true)
                .override_global("MARK_UNNECESSARY", &1u32, true)
                .load(TESTBED_OBJ)
                .expect("load testbed object");
            let dev = std::ffi::CString::new(dev).expect("interface name");
            let _ = tc::qdisc_add_clsact(&dev);
            let prog: &mut SchedClassifier = bpf
                .program_mut("natt_inject")
                .expect("natt_inject")
                .try_into()
                .expect("classifier");
            prog.load().expect("load injector");
            prog.attach(&dev, TcAttachType::Ingress)
                .expect("attach injector");
            bpf
        });
        Self { bpf }
    }

    /// Counts so far.
    #[must_use]
    pub fn stats(&self) -> InjectStats {
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.bpf.map("INJECT_STATS").expect("map"))
                .expect("per-cpu array");
        let sum = |i: InjectSlot| arr.get(&(i as u32), 0).expect("read").iter().sum::<u64>();
        let max = arr
            .get(&(InjectSlot::MaxL4Len as u32), 0)
            .expect("read")
            .iter()
            .copied()
            .max()
            .unwrap_or(0);
        InjectStats {
            marked: sum(InjectSlot::Marked),
            data_segments: sum(InjectSlot::DataSegments),
            corrupted: sum(InjectSlot::Corrupted),
            max_l4_len: max,
            icmp_messages: sum(InjectSlot::IcmpMessages),
            icmp_corrupted: sum(InjectSlot::IcmpCorrupted),
        }
    }
}

/// Result of one stream through the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamResult {
    /// Bytes the application read.
    pub received: u64,
    /// Bytes that differed from what was sent.
    pub differing: u64,
    /// Runs of differing bytes that left the one's-complement sum unchanged (`natt-peer`).
    pub invisible: u64,
}

/// Sends `bytes` from A to B over TCP, the receiver running in `cgroup`. `v6` picks the family.
/// `peer` is the `natt-peer` helper (`env!("CARGO_BIN_EXE_natt-peer")` in a test).
#[must_use]
pub fn stream(peer: &str, lab: &Lab, cgroup: &Path, bytes: u64, v6: bool) -> StreamResult {
    let addr = if v6 {
        format!("[{ADDR6_B}]:5001")
    } else {
        format!("{ADDR_B}:5001")
    };
    stream_between(peer, &lab.a, &lab.b, &addr, cgroup, bytes)
}

/// Sends `bytes` over TCP from a process in `from` to a receiver in `to` (in `cgroup`) that
/// listens on `addr`; `from` and `to` may be the same namespace (loopback).
#[must_use]
pub fn stream_between(
    peer: &str,
    from: &Netns,
    to: &Netns,
    addr: &str,
    cgroup: &Path,
    bytes: u64,
) -> StreamResult {
    let (listen, connect) = (addr.to_owned(), addr.to_owned());
    let n = bytes.to_string();
    let cg = cgroup.to_str().expect("utf-8 cgroup path");
    let mut recv = Proc::spawn(
        "natt-peer recv",
        Command::new(peer).args([
            "recv", "--netns", &to.name, "--cgroup", cg, "--listen", &listen, "--bytes", &n,
        ]),
    );
    recv.wait_for_line("READY");
    let send = Proc::spawn(
        "natt-peer send",
        Command::new(peer).args([
            "send",
            "--netns",
            &from.name,
            "--connect",
            &connect,
            "--bytes",
            &n,
        ]),
    );
    let out = recv.finish(Duration::from_secs(60));
    let _ = send.finish(Duration::from_secs(30));
    let line = out
        .lines()
        .find(|l| l.starts_with("received="))
        .unwrap_or_else(|| panic!("no result line in {out:?}"));
    let mut it = line.split_whitespace().map(|kv| {
        kv.split_once('=')
            .expect("k=v")
            .1
            .parse::<u64>()
            .expect("number")
    });
    StreamResult {
        received: it.next().expect("received"),
        differing: it.next().expect("differing"),
        invisible: it.next().expect("invisible"),
    }
}

/// Replies to one `ping`, as `natt-peer ping` judged them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingResult {
    /// Echo requests sent.
    pub sent: u64,
    /// Replies whose payload was what was sent.
    pub intact: u64,
    /// Replies whose payload differed.
    pub corrupted: u64,
    /// Requests whose reply never reached the socket.
    pub lost: u64,
}

/// Sends `count` ICMP echo requests of `size` payload bytes from a raw socket in `from` (in
/// `cgroup`) to `to`, one at a time. `peer` is the `natt-peer` helper.
#[must_use]
pub fn ping(
    peer: &str,
    from: &Netns,
    cgroup: &Path,
    to: &str,
    count: u16,
    size: usize,
) -> PingResult {
    let cg = cgroup.to_str().expect("utf-8 cgroup path");
    let (n, s) = (count.to_string(), size.to_string());
    let out = Proc::spawn(
        "natt-peer ping",
        Command::new(peer).args([
            "ping", "--netns", &from.name, "--cgroup", cg, "--to", to, "--count", &n, "--size", &s,
        ]),
    )
    .finish(Duration::from_secs(120));
    let line = out
        .lines()
        .find(|l| l.starts_with("sent="))
        .unwrap_or_else(|| panic!("no result line in {out:?}"));
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|kv| kv.split_once('=').expect("k=v").1.parse().expect("number"))
        .collect();
    PingResult {
        sent: v[0],
        intact: v[1],
        corrupted: v[2],
        lost: v[3],
    }
}
