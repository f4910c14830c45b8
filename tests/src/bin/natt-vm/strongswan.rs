//! strongSwan (charon and swanctl) for the scenario that lets a real IKE daemon negotiate, rekey and probe.

use std::{
    fs::{self, File},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use natt_monitor_tests::{KillOnDrop, net::Netns};

use crate::processes::Daemon;

pub(crate) fn vici_uri(side: &str) -> String {
    format!("unix:///tmp/ss-{side}/charon.vici")
}

/// `swanctl ARGS` in `ns`, talking to that side's charon (its own configuration and socket).
pub(crate) fn swanctl(ns: &Netns, side: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", &ns.name, "swanctl"])
        .args(args)
        .args(["--uri", &vici_uri(side)])
        .env("STRONGSWAN_CONF", format!("/tmp/ss-{side}/strongswan.conf"))
        .output()
        .unwrap_or_else(|e| panic!("swanctl {args:?}: {e}"))
}

/// A `swanctl.conf` for one end: `IKEv2` with a pre-shared key, UDP encapsulation forced even
/// without a NAT, a transport-mode child for TCP, ESP with AES-CBC and HMAC-SHA256.
pub(crate) fn swanctl_conf(local: &str, remote: &str, me: &str, them: &str) -> String {
    format!(
        r#"connections {{
  natt {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    encap = yes
    dpd_delay = 2s
    proposals = aes128-sha256-modp2048
    local {{
      auth = psk
      id = {me}.natt.test
    }}
    remote {{
      auth = psk
      id = {them}.natt.test
    }}
    children {{
      t {{
        mode = transport
        local_ts = dynamic[tcp]
        remote_ts = dynamic[tcp]
        esp_proposals = aes128-sha256
      }}
    }}
  }}
}}
secrets {{
  ike-natt {{
    id-a = a.natt.test
    id-b = b.natt.test
    secret = "natt-monitor vm suite"
  }}
}}
"#
    )
}

/// Starts charon in `ns` with its own /run (its pid file is fixed) and VICI socket, and loads
/// `swanctl` into it.
pub(crate) fn start_charon(ns: &Netns, side: &str, swanctl_conf: &str) -> Daemon {
    let dir = PathBuf::from(format!("/tmp/ss-{side}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("strongSwan dir");
    let conf = dir.join("strongswan.conf");
    fs::write(
        &conf,
        format!(
            "charon {{\n  load_modular = yes\n  install_routes = no\n  plugins {{\n    include /etc/strongswan.d/charon/*.conf\n    vici {{\n      socket = {}\n    }}\n  }}\n  filelog {{\n    natt {{\n      path = {}\n      default = 1\n    }}\n  }}\n}}\n",
            vici_uri(side),
            dir.join("charon.log").display()
        ),
    )
    .expect("strongswan.conf");
    fs::write(dir.join("swanctl.conf"), swanctl_conf).expect("swanctl.conf");
    let log = dir.join("charon.stderr");
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh", "-c"])
        .arg("mount -t tmpfs tmpfs /run && exec /usr/lib/ipsec/charon")
        .env("STRONGSWAN_CONF", &conf)
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("charon log"))
        .spawn()
        .expect("spawn charon");
    let d = Daemon {
        process: KillOnDrop(child),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.join("charon.vici").exists() {
        assert!(
            Instant::now() < deadline,
            "charon {side} did not open its VICI socket: {}{}",
            fs::read_to_string(&d.log).unwrap_or_default(),
            fs::read_to_string(dir.join("charon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let file = dir.join("swanctl.conf");
    let out = swanctl(
        ns,
        side,
        &["--load-all", "--file", file.to_str().expect("utf-8 path")],
    );
    assert!(
        out.status.success(),
        "swanctl --load-all ({side}): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    d
}
