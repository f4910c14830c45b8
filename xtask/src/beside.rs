//! A natt-monitor running on the test host the way the README's first command leaves one: the
//! whole host in scope, peers from discovery, pinned at the default path, serving the default
//! port. `cargo xtask test` starts it before the root tests and checks after them that it is
//! still running, healthy and pinned, which proves that the tests touch only what they created.
//! When a natt-monitor is already pinned at the default path (a real install), the tests run
//! beside that one instead, and it is checked the same way and left running.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Where `natt-monitor run` pins by default.
const PIN_DIR: &str = "/sys/fs/bpf/natt-monitor";
/// Where it serves by default.
const LISTEN: &str = "127.0.0.1:9874";

/// The install the tests run beside.
pub struct Install {
    /// Ours, to stop and detach at the end; `None` for one that was already there.
    child: Option<Child>,
    /// The binary, for `detach`.
    bin: PathBuf,
    log: PathBuf,
}

fn link() -> PathBuf {
    Path::new(PIN_DIR).join("link")
}

/// `GET path` on the default port; the status code.
fn status(path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&LISTEN.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    reply.split_whitespace().nth(1)?.parse().ok()
}

impl Install {
    /// Starts `bin run` with its defaults, unless one is pinned already; waits until it is
    /// attached and healthy.
    ///
    /// # Errors
    /// When it exits or is not healthy within 60 s.
    pub fn start(bin: &Path) -> Result<Self> {
        let log = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/beside-install.log");
        if link().exists() {
            eprintln!(
                "xtask: a natt-monitor is already pinned at {PIN_DIR}: the root tests run beside it, and it is left running"
            );
            return Ok(Self {
                child: None,
                bin: bin.to_owned(),
                log,
            });
        }
        let out = std::fs::File::create(&log).with_context(|| log.display().to_string())?;
        let child = Command::new(bin)
            .args(["run", "--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut install = Self {
            child: Some(child),
            bin: bin.to_owned(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(link().exists() && status("/healthz") == Some(200)) {
            if let Some(exit) = install.exited()? {
                bail!(
                    "the natt-monitor started beside the tests exited ({exit}) before it was healthy; its log: {}",
                    install.log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the natt-monitor started beside the tests was not healthy within 60 s; its log: {}",
                    install.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "xtask: natt-monitor runs beside the root tests (whole host, discovery, pinned at {PIN_DIR}, {LISTEN}); log: {}",
            install.log.display()
        );
        Ok(install)
    }

    fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match &mut self.child {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }

    /// Checks that the install is as the tests found it, then stops and detaches ours.
    ///
    /// # Errors
    /// When it exited, is unhealthy or lost its pins during the tests.
    pub fn finish(mut self) -> Result<()> {
        if let Some(exit) = self.exited()? {
            bail!(
                "the natt-monitor running beside the tests exited during them ({exit}): a test disturbed an install it did not create; its log: {}",
                self.log.display()
            );
        }
        if !link().exists() {
            bail!("the tests removed the pins of the natt-monitor running beside them ({PIN_DIR})");
        }
        if let Some(code) = status("/healthz").filter(|c| *c != 200) {
            bail!(
                "the natt-monitor running beside the tests answers /healthz with {code} after them"
            );
        }
        let Some(mut child) = self.child.take() else {
            eprintln!("xtask: the natt-monitor installed on this host is untouched");
            return Ok(());
        };
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(i32::try_from(child.id())?, libc::SIGTERM) };
        let exit = child.wait()?;
        if !exit.success() {
            bail!("the natt-monitor beside the tests exited with {exit} on SIGTERM");
        }
        let detach = Command::new(&self.bin).arg("detach").output();
        if link().exists() {
            bail!("`natt-monitor detach` left {PIN_DIR} in place: {detach:?}");
        }
        eprintln!(
            "xtask: the natt-monitor beside the root tests ran through them untouched; stopped and detached"
        );
        Ok(())
    }
}

impl Drop for Install {
    /// On a failed run: stop ours and remove its pins, so that the host is left as found.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new(&self.bin).arg("detach").output();
        }
    }
}
