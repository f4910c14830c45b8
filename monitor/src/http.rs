//! The HTTP endpoint: `/metrics` (Prometheus text format), `/healthz`, and an index at `/`.
//!
//! hyper's HTTP/1 server on tokio. Scrapes read kernel maps, which are blocking syscalls, so
//! they run on the blocking pool. Connections are capped and slow clients time out, so a
//! misbehaving scraper cannot exhaust the daemon.

use std::{convert::Infallible, net::TcpListener as StdListener, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};

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

/// At most this many connections are served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 32;
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const INDEX: &str = "<html><head><title>natt-monitor</title></head><body>\
<h1>natt-monitor</h1><p><a href=\"/metrics\">metrics</a> &middot; <a href=\"/healthz\">healthz</a></p>\
</body></html>\n";

/// Serves until the listener fails. Per-connection errors are not fatal; a failing accept is.
///
/// # Errors
/// The accept error, or failure to register the listener with tokio.
pub async fn serve(listener: StdListener, exporter: Arc<dyn Exporter>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = Arc::clone(&slots)
            .acquire_owned()
            .await
            .map_err(std::io::Error::other)?;
        let (stream, _) = listener.accept().await?;
        let exporter = Arc::clone(&exporter);
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, Arc::clone(&exporter)));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
            drop(permit);
        });
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
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET and HEAD\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => match tokio::task::spawn_blocking(move || exporter.scrape()).await {
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
        },
        "/healthz" => match exporter.health() {
            Ok(()) => response(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
            Err(why) => response(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("{why}\n"),
            ),
        },
        "/" => response(StatusCode::OK, "text/html; charset=utf-8", INDEX.into()),
        _ => response(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; try /metrics or /healthz\n".into(),
        ),
    })
}
