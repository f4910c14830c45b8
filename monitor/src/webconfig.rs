//! `--web.config.file`: TLS and basic authentication for `/metrics`, in the file format of the
//! Prometheus exporter-toolkit, so that the same file serves natt-monitor and `node_exporter`.
//!
//! Supported keys: `tls_server_config` (`cert_file`, `key_file`, `client_auth_type`
//! `NoClientCert` or `RequireAndVerifyClientCert` with `client_ca_file`, `min_version` `TLS12` or
//! `TLS13`) and `basic_auth_users` (user: bcrypt hash). Any other key is refused by name, so a
//! setting natt-monitor would ignore never gives a false sense of protection. Relative paths
//! are relative to the file's directory, as in exporter-toolkit. The file is read at start (and
//! by `check --config`); changing it, or rotating the certificate, needs a restart.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;

/// The file's schema.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    min_version: Option<String>,
}

/// Why the web configuration cannot be used. The text names the file and, where it can, the
/// key.
#[derive(Debug, thiserror::Error)]
#[error("--web.config.file {}: {reason}", path.display())]
pub struct WebConfigError {
    path: PathBuf,
    reason: String,
}

/// What the endpoint enforces.
#[derive(Clone, Debug, Default)]
pub struct WebConfig {
    /// TLS, when configured.
    pub tls: Option<Arc<ServerConfig>>,
    /// Users and their bcrypt hashes; empty: no authentication.
    users: BTreeMap<String, String>,
    /// `Authorization` header values that verified, so that bcrypt's deliberate slowness is
    /// paid once per credential, not per scrape (bounded by `VERIFIED_CACHE`).
    verified: Arc<Mutex<HashSet<String>>>,
}

/// Most verified credentials remembered.
const VERIFIED_CACHE: usize = 64;

impl WebConfig {
    /// Reads and checks `path`: the TLS certificate and key load, every hash is a bcrypt hash.
    ///
    /// # Errors
    /// `WebConfigError` naming the file and what is wrong.
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let err = |reason: String| WebConfigError {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let file: File = if text.trim().is_empty() {
            File::default()
        } else {
            serde_yaml_ng::from_str(&text).map_err(|e| err(e.to_string()))?
        };
        for (user, hash) in &file.basic_auth_users {
            hash.parse::<bcrypt::HashParts>().map_err(|e| {
                err(format!(
                    "basic_auth_users.{user}: not a bcrypt hash ({e}); make one with `htpasswd -nBC 10 {user}`"
                ))
            })?;
        }
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let tls = file
            .tls_server_config
            .map(|t| tls_config(&t, dir).map(Arc::new))
            .transpose()
            .map_err(err)?;
        Ok(Self {
            tls,
            users: file.basic_auth_users,
            verified: Arc::default(),
        })
    }

    /// True when requests must carry one of the users' credentials.
    #[must_use]
    pub fn requires_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// Whether an `Authorization` header value grants access. Slow (bcrypt) the first time a
    /// credential is seen: call it off the async runtime.
    #[must_use]
    pub fn authorized(&self, header: Option<&str>) -> bool {
        if self.users.is_empty() {
            return true;
        }
        let Some(header) = header else {
            return false;
        };
        if self.verified.lock().is_ok_and(|v| v.contains(header)) {
            return true;
        }
        let Some((user, pass)) = basic_credentials(header) else {
            return false;
        };
        let ok = self
            .users
            .get(&user)
            .is_some_and(|hash| bcrypt::verify(&pass, hash).unwrap_or(false));
        if ok && let Ok(mut v) = self.verified.lock() {
            if v.len() >= VERIFIED_CACHE {
                v.clear();
            }
            v.insert(header.to_owned());
        }
        ok
    }
}

/// The user and password of a `Basic` authorization header.
fn basic_credentials(header: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let encoded = header
        .strip_prefix("Basic ")
        .or_else(|| header.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

fn tls_config(t: &TlsFile, dir: &Path) -> Result<ServerConfig, String> {
    let at = |p: &Path| dir.join(p);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(at(&t.cert_file))
        .and_then(Iterator::collect)
        .map_err(|e| format!("tls_server_config.cert_file {}: {e}", t.cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls_server_config.cert_file {}: no certificate in it",
            t.cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(at(&t.key_file))
        .map_err(|e| format!("tls_server_config.key_file {}: {e}", t.key_file.display()))?;
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version.as_deref() {
        None | Some("TLS12") => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some("TLS13") => &[&rustls::version::TLS13],
        Some(other) => {
            return Err(format!(
                "tls_server_config.min_version: `{other}` is not supported (TLS12 or TLS13)"
            ));
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(|e| format!("tls_server_config: {e}"))?;
    let builder = match (t.client_auth_type.as_deref(), &t.client_ca_file) {
        (None | Some("NoClientCert"), _) => builder.with_no_client_auth(),
        (Some("RequireAndVerifyClientCert"), Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(at(ca))
                .map_err(|e| format!("tls_server_config.client_ca_file {}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| {
                    format!("tls_server_config.client_ca_file {}: {e}", ca.display())
                })?;
                roots.add(c).map_err(|e| {
                    format!("tls_server_config.client_ca_file {}: {e}", ca.display())
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("tls_server_config.client_ca_file: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        (Some("RequireAndVerifyClientCert"), None) => {
            return Err(
                "tls_server_config.client_auth_type RequireAndVerifyClientCert needs client_ca_file"
                    .into(),
            );
        }
        (Some(other), _) => {
            return Err(format!(
                "tls_server_config.client_auth_type: `{other}` is not supported (NoClientCert or RequireAndVerifyClientCert)"
            ));
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!("tls_server_config: the certificate and key do not go together: {e}")
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempdir::Dir, PathBuf) {
        let d = tempdir::Dir::new();
        let p = d.0.join("web.yml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "natt-web-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn basic_auth_checks_the_bcrypt_hash_and_caches_success() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let (_d, p) = file(&format!("basic_auth_users:\n  alice: {hash}\n"));
        let w = WebConfig::load(&p).unwrap();
        assert!(w.requires_auth() && w.tls.is_none());
        let header = |up: &str| {
            use base64::Engine as _;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(up)
            )
        };
        assert!(!w.authorized(None));
        assert!(!w.authorized(Some(&header("alice:wrong"))));
        assert!(!w.authorized(Some(&header("bob:s3cret"))));
        assert!(!w.authorized(Some("Bearer abc")));
        assert!(w.authorized(Some(&header("alice:s3cret"))));
        assert!(w.verified.lock().unwrap().contains(&header("alice:s3cret")));
        assert!(w.authorized(Some(&header("alice:s3cret"))));
        // No users: everything is allowed.
        assert!(WebConfig::default().authorized(None));
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let (_d, p) = file("basic_auth_users:\n  alice: plaintext\n");
        let e = WebConfig::load(&p).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "--web.config.file {}: basic_auth_users.alice: not a bcrypt hash",
                p.display()
            )),
            "{e}"
        );
        let (_d, p) = file("http_server_config:\n  http2: false\n");
        let e = WebConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("unknown field `http_server_config`"), "{e}");
        let (_d, p) =
            file("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n");
        let e = WebConfig::load(&p).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "--web.config.file {}: tls_server_config.cert_file missing.crt:",
                p.display()
            )),
            "{e}"
        );
        let e = WebConfig::load(Path::new("/nonexistent/web.yml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--web.config.file /nonexistent/web.yml: No such file or directory (os error 2)"
        );
    }
}
