//! The packaged artifacts of `cargo xtask dist` (root only): the static binary needs no dynamic
//! loader, the .deb installs into an empty root with dpkg, and natt-monitor runs from that root
//! (chrooted, with the host's /proc and /sys): `check --config` on the packaged configuration
//! and a short run that attaches, serves /metrics and exits cleanly.
//!
//! `cargo xtask test` builds the artifacts first and names them in `NATT_DIST_DIR`; without it,
//! the test looks in target/dist and skips, saying why, when nothing was built there.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use natt_monitor_tests::{
    KillOnDrop, http_get, metric, net::Cgroup, one_peer_run, skip_unless_root,
};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The dist directory, or `None` (with the reason printed) when the test cannot run.
fn dist_dir(test: &str) -> Option<PathBuf> {
    let (dir, required) = match std::env::var_os("NATT_DIST_DIR") {
        Some(d) => (PathBuf::from(d), true),
        None => (
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dist"),
            false,
        ),
    };
    let deb = dir.join(format!("natt-monitor_{VERSION}_amd64.deb"));
    if deb.exists() {
        return Some(dir);
    }
    assert!(!required, "NATT_DIST_DIR has no {}", deb.display());
    eprintln!(
        "SKIP {test}: no {} (run `cargo xtask dist`; `cargo xtask test` does)",
        deb.display()
    );
    None
}

fn out(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// An empty root with a dpkg database, and the host's /proc and /sys bound into it; unmounted
/// and removed on drop.
struct Root {
    dir: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Root {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("natt-deb-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in [
            "var/lib/dpkg/info",
            "var/lib/dpkg/updates",
            "proc",
            "sys",
            "tmp",
        ] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        for f in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        Self {
            dir,
            mounts: Vec::new(),
        }
    }

    fn bind(&mut self, what: &str) {
        let at = self.dir.join(what.trim_start_matches('/'));
        out(Command::new("mount").args(["--rbind", what]).arg(&at));
        self.mounts.push(at);
    }

    fn chroot(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("chroot");
        cmd.arg(&self.dir).arg("/usr/bin/natt-monitor").args(args);
        cmd
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").args(["-R", "-l"]).arg(m).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every file the package promises is in `root`, the unit pointing at the packaged binary.
fn assert_installed(root: &Path) {
    for f in [
        "usr/bin/natt-monitor",
        "lib/systemd/system/natt-monitor.service",
        "etc/natt-monitor/natt-monitor.toml",
        "usr/share/man/man1/natt-monitor.1.gz",
        "usr/share/man/man1/natt-monitor-run.1.gz",
        "usr/share/bash-completion/completions/natt-monitor",
        "usr/share/zsh/vendor-completions/_natt-monitor",
        "usr/share/fish/vendor_completions.d/natt-monitor.fish",
        "usr/share/doc/natt-monitor/copyright",
        "usr/share/doc/natt-monitor/LICENSE-MIT",
        "usr/share/doc/natt-monitor/LICENSE-APACHE",
        "usr/share/doc/natt-monitor/examples/natt-monitor.example.toml",
    ] {
        assert!(root.join(f).is_file(), "{f} not installed");
    }
    let unit =
        std::fs::read_to_string(root.join("lib/systemd/system/natt-monitor.service")).unwrap();
    assert!(
        unit.contains(
            "ExecStart=/usr/bin/natt-monitor run --config /etc/natt-monitor/natt-monitor.toml"
        ),
        "{unit}"
    );
    // The maintainer scripts: removal detaches wherever the configuration pins, an upgrade
    // restarts a running daemon, a purge removes the state directory (captures).
    let script = |name: &str| {
        let info = root
            .join("var/lib/dpkg/info")
            .join(format!("natt-monitor.{name}"));
        std::fs::read_to_string(&info).unwrap_or_else(|e| panic!("{}: {e}", info.display()))
    };
    assert!(
        script("prerm")
            .contains("/usr/bin/natt-monitor detach --config /etc/natt-monitor/natt-monitor.toml")
    );
    assert!(script("postinst").contains("systemctl try-restart natt-monitor.service"));
    assert!(script("postrm").contains("rm -rf /var/lib/natt-monitor"));
}

#[test]
fn the_static_binary_needs_no_loader() {
    let Some(dist) = dist_dir("the_static_binary_needs_no_loader") else {
        return;
    };
    let file = out(Command::new("file").arg(dist.join("natt-monitor")));
    assert!(
        file.contains("statically linked") || file.contains("static-pie linked"),
        "{file}"
    );
    let version = out(Command::new(dist.join("natt-monitor")).arg("--version"));
    assert_eq!(version, format!("natt-monitor {VERSION}\n"));
    // What it runs, and nothing the tests use: the verifier object is embedded, the test
    // injector (`natt_inject`, the tests' and benches' `testbed` feature) is not.
    let bin = std::fs::read(dist.join("natt-monitor")).expect("read the binary");
    let holds = |name: &[u8]| bin.windows(name.len()).any(|w| w == name);
    assert!(holds(b"natt_verify_compat"), "no verifier object inside");
    assert!(!holds(b"natt_inject"), "the test injector is inside");
}

#[test]
fn the_deb_installs_into_a_clean_root_and_runs_from_it() {
    if skip_unless_root("the_deb_installs_into_a_clean_root_and_runs_from_it") {
        return;
    }
    let Some(dist) = dist_dir("the_deb_installs_into_a_clean_root_and_runs_from_it") else {
        return;
    };
    let deb = dist.join(format!("natt-monitor_{VERSION}_amd64.deb"));
    let info = out(Command::new("dpkg-deb").arg("--field").arg(&deb));
    for line in [
        "Package: natt-monitor".to_owned(),
        format!("Version: {VERSION}"),
        "Architecture: amd64".to_owned(),
    ] {
        assert!(info.lines().any(|l| l == line), "{line} in {info}");
    }
    let mut root = Root::new();
    out(Command::new("dpkg")
        .arg(format!("--root={}", root.dir.display()))
        .args(["--log=/dev/null", "--force-script-chrootless", "--install"])
        .arg(&deb)
        .env("DPKG_ROOT", &root.dir));
    let status = out(Command::new("dpkg")
        .arg(format!("--root={}", root.dir.display()))
        .args(["--status", "natt-monitor"]));
    assert!(
        status.lines().any(|l| l == "Status: install ok installed"),
        "{status}"
    );
    assert!(
        status.lines().any(|l| l
            .trim_start()
            .starts_with("/etc/natt-monitor/natt-monitor.toml ")),
        "the configuration is a conffile: {status}"
    );
    assert_installed(&root.dir);
    // Run from the installed root: the binary alone, with the host's kernel interfaces.
    root.bind("/proc");
    root.bind("/sys");
    let check =
        out(&mut root.chroot(&["check", "--config", "/etc/natt-monitor/natt-monitor.toml"]));
    // The packaged configuration has no peers: discovery, observe mode.
    assert!(check.starts_with("ok    config                 /etc/natt-monitor/natt-monitor.toml: 0 static peers, discover xfrm, default mode observe, scope auto, cgroup /sys/fs/cgroup"), "{check}");
    assert!(check.ends_with("\nthe configuration is valid\n"), "{check}");
    let cg = Cgroup::new();
    let mut child = KillOnDrop(
        root.chroot(&one_peer_run(
            cg.path.to_str().unwrap(),
            &[
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--pin-path",
                "none",
            ],
        ))
        .stderr(Stdio::piped())
        .spawn()
        .expect("chroot natt-monitor run"),
    );
    let err = child.stderr.take().unwrap();
    let mut lines = BufReader::new(err).lines().map_while(Result::ok);
    // The daemon logs the line or exits (ending the stream), so this does not hang.
    let attached = lines
        .by_ref()
        .find(|l| l.contains("verifier attached at cgroup_skb ingress"))
        .expect("an attached line");
    let v: serde_json::Value = serde_json::from_str(&attached).expect("json");
    let listen = v["listen"].as_str().expect("listen");
    let (code, body) = http_get(&format!("http://{listen}/metrics")).expect("scrape");
    assert_eq!(code, 200);
    assert_eq!(metric(&body, "natt_monitor_up"), Some(1), "{body}");
    assert!(body.contains(&format!(
        "natt_monitor_build_info{{revision=\"{}\",version=\"{VERSION}\"}} 1",
        natt_monitor::metrics::REVISION
    )));
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let rest: Vec<String> = lines.collect();
    assert!(
        rest.iter().any(|l| l.contains("verifier detached")),
        "{rest:?}"
    );
}

/// A container engine from Debian's archive that can run the image here: podman with runc
/// (crun refuses hosts whose cgroup v2 is mounted beside v1, as on this kind of machine).
/// `None`, with the reason printed, where none can.
fn podman_runs(test: &str) -> Option<()> {
    let ok = |args: &[&str]| {
        Command::new("podman")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ok(&["--runtime", "runc", "info"]) {
        eprintln!(
            "SKIP {test}: `podman --runtime runc info` does not answer (scripts/setup.sh --test installs podman, runc and netavark)"
        );
        return None;
    }
    Some(())
}

/// The image's containers and tag, removed however the test ends.
struct Podman {
    id: String,
    tag: String,
    names: Vec<String>,
}

impl Podman {
    /// Builds the image from `context` under a tag of its own.
    fn build(context: &Path) -> Self {
        let id = natt_monitor_tests::net::unique("natt-img-");
        let engine = Self {
            tag: format!("localhost/natt-monitor-test:{id}"),
            id,
            names: Vec::new(),
        };
        let ctx = context.to_str().unwrap();
        podman(&["build", "--quiet", "--tag", &engine.tag, ctx]);
        let size: u64 = podman(&["image", "inspect", "--format", "{{.Size}}", &engine.tag])
            .trim()
            .parse()
            .unwrap();
        eprintln!("image {}: {size} bytes", engine.tag);
        // FROM scratch: the static binary, the configuration and the licences.
        assert!(size < 16 << 20, "{size}");
        engine
    }

    /// `podman --runtime runc run` in the shape deploy/kubernetes runs the image: the host's
    /// network, only `CAP_BPF`, `CAP_PERFMON` and `CAP_NET_ADMIN`, a read-only root, the host's
    /// bpffs, cgroup2 hierarchy and procfs. Explicit ulimits: podman's default
    /// `RLIMIT_NOFILE` and `RLIMIT_NPROC` exceed this machine's hard limits.
    fn run(&mut self, name: &str, detached: bool, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("podman");
        cmd.args(["--runtime", "runc", "run", "--name", name]);
        if detached {
            cmd.arg("--detach");
        } else {
            cmd.arg("--rm");
        }
        cmd.args([
            "--network=host",
            "--cap-drop=all",
            "--cap-add=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN",
            "--read-only",
            "--ulimit=nofile=4096:4096",
            "--ulimit=nproc=4096:4096",
            "--security-opt=seccomp=unconfined",
            "--volume=/sys/fs/bpf:/sys/fs/bpf",
            "--volume=/sys/fs/cgroup:/sys/fs/cgroup:ro",
            "--volume=/proc:/host/proc:ro",
            &self.tag,
        ])
        .args(args);
        self.names.push(name.to_owned());
        cmd.output().expect("podman run")
    }
}

/// `podman --runtime runc ARGS`, which must succeed; its output.
fn podman(args: &[&str]) -> String {
    out(Command::new("podman")
        .args(["--runtime", "runc"])
        .args(args))
}

/// Waits up to 30 s for `/healthz` at `listen` to answer 200.
fn wait_healthy(listen: &str, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !http_get(&format!("http://{listen}/healthz")).is_ok_and(|(c, _)| c == 200) {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never became healthy"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// What container `name` wrote (the daemon logs to stderr).
fn container_logs(name: &str) -> String {
    let o = Command::new("podman")
        .args(["logs", name])
        .output()
        .expect("podman logs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl Drop for Podman {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("podman").args(["rm", "-f", name]).output();
        }
        let _ = Command::new("podman")
            .args(["rmi", "-f", &self.tag])
            .output();
    }
}

/// The image `cargo xtask dist` builds, built and run under a real container engine as the
/// daemon set runs it: it attaches and serves metrics; a stopped container leaves the verifier
/// pinned and attached; the next container adopts it; `detach` run from the image removes it.
#[test]
fn the_image_runs_pins_hands_over_and_detaches_under_podman() {
    const TEST: &str = "the_image_runs_pins_hands_over_and_detaches_under_podman";
    if skip_unless_root(TEST) {
        return;
    }
    let Some(dist) = dist_dir(TEST) else {
        return;
    };
    if podman_runs(TEST).is_none() {
        return;
    }
    let mut engine = Podman::build(&dist.join("container"));
    let id = engine.id.clone();

    let pins = natt_monitor_tests::PinDir::new();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = free.local_addr().unwrap().to_string();
    drop(free);
    let run = [
        "run",
        "--config",
        "/etc/natt-monitor/natt-monitor.toml",
        "--proc-path",
        "/host/proc",
        "--pin-path",
        pins.arg(),
        "--listen",
        &listen,
        "--log-format",
        "json",
    ];
    let wait_healthy = |what: &str| wait_healthy(&listen, what);
    let link = pins.path.join(natt_monitor::pin::LINK_FILE);
    let prog = || {
        natt_monitor::pin::Link::open(&link)
            .and_then(|l| l.info())
            .map(|i| i.prog_id)
            .ok()
    };

    let first = format!("{id}-1");
    let o = engine.run(&first, true, &run);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_healthy(&first);
    let (code, body) = http_get(&format!("http://{listen}/metrics")).unwrap();
    assert_eq!(code, 200);
    assert_eq!(metric(&body, "natt_monitor_up"), Some(1), "{body}");
    assert!(body.contains(&format!(
        "natt_monitor_build_info{{revision=\"{}\",version=\"{VERSION}\"}} 1",
        natt_monitor::metrics::REVISION
    )));
    let attached = prog().expect("the first container pinned its link");

    // Stopped (SIGTERM, as the kubelet stops a pod): exit 0, the verifier stays pinned.
    podman(&["stop", "--time", "10", &first]);
    assert_eq!(
        podman(&["inspect", "--format", "{{.State.ExitCode}}", &first]).trim(),
        "0"
    );
    assert_eq!(
        prog(),
        Some(attached),
        "the link stays, running the same program"
    );
    let logs = container_logs(&first);
    assert!(
        logs.contains("the verifier stays attached, pinned with its maps"),
        "{logs}"
    );

    // The next container adopts it: the link is the same, its program replaced atomically.
    let second = format!("{id}-2");
    let o = engine.run(&second, true, &run);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_healthy(&second);
    let logs = container_logs(&second);
    assert!(
        logs.contains(
            "adopted the pinned link: its program was replaced by this one in one atomic update"
        ),
        "{logs}"
    );
    assert!(
        logs.contains(&format!("\"old_prog_id\":{attached}")),
        "{logs}"
    );
    podman(&["stop", "--time", "10", &second]);

    // `detach` from the image removes it.
    let o = engine.run(
        &format!("{id}-detach"),
        false,
        &["detach", "--pin-path", pins.arg()],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.starts_with("detached link "), "{text}");
    assert!(
        text.ends_with(&format!("removed {}\n", pins.arg())),
        "{text}"
    );
    assert!(!pins.path.exists());
    assert!(prog().is_none());
}
