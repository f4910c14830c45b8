//! The HTTP endpoint: `/metrics` (Prometheus text format), `/healthz`, and an index at `/`.
//!
//! hyper's HTTP/1 server on tokio. Scrapes read kernel maps, which are blocking syscalls, so
//! they run on the blocking pool. Connections are capped and slow clients time out, so a
//! misbehaving scraper cannot exhaust the daemon. With `--web.config.file` the endpoint speaks
//! TLS and asks for basic authentication (`crate::webconfig`); a TLS handshake must finish
//! within the header timeout too.

use std::{convert::Infallible, net::TcpListener as StdListener, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::Semaphore,
};

use crate::webconfig::WebConfig;

/// What the endpoint serves; implemented by the daemon.
pub trait Exporter: Send + Sync + 'static {
    /// The `/metrics` body. Called on the blocking pool.
    fn scrape(&self) -> String;
    /// `Ok(())` when healthy.
    ///
    /// # Errors
    /// Why not: the `/healthz` 503 body.
    fn health(&self) -> Result<(), String>;
}

/// At most this many connections are served at once; more wait in the accept queue. With
/// `MAX_REQUEST_BUF` this bounds what clients can make the endpoint hold (4 MiB), while
/// idle or slow clients would need hundreds of connections to keep a scrape waiting.
const MAX_CONNECTIONS: usize = 256;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of request one connection buffers; longer headers are answered with 431.
const MAX_REQUEST_BUF: usize = 16 * 1024;

/// What the endpoint serves besides the scrape: its authentication and the metrics path.
#[derive(Debug)]
pub struct Site {
    /// TLS and basic authentication (`--web.config.file`).
    pub web: WebConfig,
    /// Where the metrics are (`--web.telemetry-path`).
    pub metrics_path: String,
}

impl Default for Site {
    fn default() -> Self {
        Self {
            web: WebConfig::default(),
            metrics_path: crate::config::DEFAULT_TELEMETRY_PATH.to_owned(),
        }
    }
}

impl Site {
    /// What `settings` say: `--web.config.file` and `--web.telemetry-path`.
    #[must_use]
    pub fn of(settings: &crate::config::Settings) -> Self {
        Self {
            web: settings.web.clone().unwrap_or_default(),
            metrics_path: settings.telemetry_path.clone(),
        }
    }

    fn index(&self) -> String {
        format!(
            "<html><head><title>natt-monitor</title></head><body>\
<h1>natt-monitor</h1><p><a href=\"{}\">metrics</a> &middot; <a href=\"/healthz\">healthz</a></p>\
</body></html>\n",
            self.metrics_path
        )
    }
}

/// Serves until the listener fails. Per-connection errors are not fatal; a failing accept is.
///
/// # Errors
/// The accept error, or failure to register the listener with tokio.
pub async fn serve(
    listener: StdListener,
    exporter: Arc<dyn Exporter>,
    site: Arc<Site>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tls = site.web.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    loop {
        let permit = Arc::clone(&slots)
            .acquire_owned()
            .await
            .map_err(std::io::Error::other)?;
        let (stream, _) = listener.accept().await?;
        let exporter = Arc::clone(&exporter);
        let site = Arc::clone(&site);
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => connection(stream, exporter, site).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
                None => connection(stream, exporter, site).await,
            }
            drop(permit);
        });
    }
}

/// One HTTP/1 connection over `io` (TCP, or TLS over TCP).
async fn connection<I>(io: I, exporter: Arc<dyn Exporter>, site: Arc<Site>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| handle(req, Arc::clone(&exporter), Arc::clone(&site)));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BUF)
        .serve_connection(TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "metrics connection ended with an error");
    }
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn handle(
    req: Request<Incoming>,
    exporter: Arc<dyn Exporter>,
    site: Arc<Site>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // /healthz answers without credentials, so that probes (kubelet, load balancers) need none;
    // it says only whether the verifier is attached and draining.
    if site.web.requires_auth() && req.uri().path() != "/healthz" {
        let header = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // bcrypt is slow on purpose: off the runtime.
        let auth = Arc::clone(&site);
        let ok = tokio::task::spawn_blocking(move || auth.web.authorized(header.as_deref()))
            .await
            .unwrap_or(false);
        if !ok {
            let mut r = response(
                StatusCode::UNAUTHORIZED,
                "text/plain; charset=utf-8",
                "unauthorized\n".into(),
            );
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"natt-monitor\""),
            );
            return Ok(r);
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET and HEAD\n".into(),
        ));
    }
    let path = req.uri().path();
    Ok(match path {
        p if p == site.metrics_path => {
            match tokio::task::spawn_blocking(move || exporter.scrape()).await {
                Ok(body) => response(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    body,
                ),
                Err(e) => response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain; charset=utf-8",
                    format!("scrape failed: {e}\n"),
                ),
            }
        }
        "/healthz" => match exporter.health() {
            Ok(()) => response(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
            Err(why) => response(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("{why}\n"),
            ),
        },
        "/" => response(StatusCode::OK, "text/html; charset=utf-8", site.index()),
        _ => response(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            format!("not found; try {} or /healthz\n", site.metrics_path),
        ),
    })
}

/// A served endpoint for tests, with a fixed scrape body.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::SocketAddr;

    use super::{Arc, Exporter, StdListener, serve};

    /// What `Stub` serves at `/metrics`.
    pub(crate) const BODY: &str = "natt_monitor_up 1\n";

    struct Stub;

    impl Exporter for Stub {
        fn scrape(&self) -> String {
            BODY.into()
        }
        fn health(&self) -> Result<(), String> {
            Ok(())
        }
    }

    /// Serves `Stub` on a loopback port, on a runtime of its own, for the test's life.
    pub(crate) fn start() -> SocketAddr {
        start_with(super::Site::default())
    }

    /// As `start`, with `site`'s metrics path and authentication.
    pub(crate) fn start_with(site: super::Site) -> SocketAddr {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(serve(listener, Arc::new(Stub), Arc::new(site)))
                .unwrap();
        });
        addr
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{SocketAddr, TcpStream},
        time::Instant,
    };

    use super::{
        testing::{BODY, start, start_with},
        *,
    };

    /// One request on its own connection; the whole reply.
    fn request(addr: SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(req);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    const SCRAPE: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    #[test]
    fn slow_clients_and_oversized_requests_do_not_stop_scrapes() {
        let addr = start();
        // 200 clients that open a request and never finish its headers.
        let idle: Vec<TcpStream> = (0..200)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").unwrap();
                s
            })
            .collect();
        let t = Instant::now();
        let reply = request(addr, SCRAPE);
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.ends_with(BODY), "{reply}");
        assert!(
            t.elapsed() < HEADER_TIMEOUT,
            "a scrape behind 200 slow clients took {:?}",
            t.elapsed()
        );
        // A header past the buffer limit is refused, not buffered.
        let mut big = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 1 << 20));
        big.extend_from_slice(b"\r\n\r\n");
        let reply = request(addr, &big);
        assert!(
            reply.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
            "{reply}"
        );
        // The slow clients are cut off at the header timeout, and scrapes go on.
        let mut first = &idle[0];
        let mut rest = Vec::new();
        first.set_read_timeout(Some(HEADER_TIMEOUT * 3)).unwrap();
        let _ = first.read_to_end(&mut rest);
        assert!(
            t.elapsed() < HEADER_TIMEOUT * 3,
            "a slow client was never cut off"
        );
        assert!(request(addr, SCRAPE).starts_with("HTTP/1.1 200 OK"));
    }

    #[test]
    fn the_metrics_move_to_the_telemetry_path() {
        let addr = start_with(Site {
            metrics_path: "/natt/metrics".into(),
            ..Site::default()
        });
        let reply = request(
            addr,
            b"GET /natt/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.ends_with(BODY), "{reply}");
        let reply = request(addr, SCRAPE);
        assert!(reply.starts_with("HTTP/1.1 404 Not Found"), "{reply}");
        assert!(
            reply.ends_with("not found; try /natt/metrics or /healthz\n"),
            "{reply}"
        );
        let reply = request(
            addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(
            reply.contains("<a href=\"/natt/metrics\">metrics</a>"),
            "{reply}"
        );
    }
}
