//! The plugin's HTTP server: hyper 1 over a unix socket, one task per connection.
//!
//! Every request body is capped at [`MAX_BODY`]; every driver call runs on the blocking pool
//! so filesystem work never stalls the runtime and calls for different caches run in parallel.

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::UnixListener;

use crate::driver::Driver;
use crate::protocol::{self, Endpoint, Reply, MAX_BODY};

fn respond(reply: &Reply) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&reply.body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = "application/vnd.docker.plugins.v1.2+json".parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

fn error_reply(status: u16, msg: String) -> Reply {
    Reply {
        status,
        body: json!({ "Err": msg }),
    }
}

async fn handle(
    req: Request<Incoming>,
    driver: Arc<Driver>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let Some(ep) = Endpoint::from_path(&path) else {
        tracing::warn!(path, "unknown endpoint");
        return Ok(respond(&error_reply(
            404,
            format!("unknown endpoint {path:?}"),
        )));
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let msg = if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                format!("request body larger than {MAX_BODY} bytes")
            } else {
                format!("reading request body: {e}")
            };
            return Ok(respond(&error_reply(413, msg)));
        }
    };
    let started = std::time::Instant::now();
    let name = protocol::request_name(&body);
    let reply =
        match tokio::task::spawn_blocking(move || protocol::handle(&driver, ep, &body)).await {
            Ok(r) => r,
            Err(e) => error_reply(500, format!("internal error: {e}")),
        };
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if reply.status != 200 {
        tracing::warn!(endpoint = ?ep, volume = ?name, status = reply.status, ms, err = %reply.body["Err"], "request failed");
    } else if ep.changes_state() {
        tracing::info!(endpoint = ?ep, volume = ?name, ms, "request");
    } else {
        tracing::debug!(endpoint = ?ep, volume = ?name, ms, "request");
    }
    Ok(respond(&reply))
}

/// Binds `socket` (root-only), refusing to steal it from a live server.
pub fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(m) = std::fs::symlink_metadata(socket) {
        if !m.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; remove it or choose another --socket",
                socket.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!(
                "another server is listening on {}; stop it or choose another --socket",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let l = UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", socket.display()))?;
    Ok(l)
}

/// Starts the background work of a server on its own thread: startup recovery first, then a
/// sweep of orphaned sessions every `sweep` (none when zero). Blocking work, off the runtime.
pub fn spawn_maintenance(driver: Arc<Driver>, sweep: std::time::Duration) {
    let r = std::thread::Builder::new()
        .name("recovery-sweep".into())
        .spawn(move || {
            if let Err(e) = driver.recover() {
                tracing::error!(error = %e, "startup recovery failed; the sweep retries");
            }
            if sweep.is_zero() {
                return;
            }
            loop {
                std::thread::sleep(sweep);
                match driver.sweep() {
                    Some(0) => tracing::debug!("sweep: no orphaned session"),
                    Some(n) => tracing::info!(ended = n, "sweep ended orphaned sessions"),
                    None => tracing::debug!("sweep skipped: the previous one still runs"),
                }
            }
        });
    if let Err(e) = r {
        tracing::error!(error = %e, "could not start the recovery thread");
    }
}

/// Serves requests on `listener` until `shutdown` completes, then removes the socket.
pub async fn serve(
    listener: UnixListener,
    socket: &Path,
    driver: Arc<Driver>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            acc = listener.accept() => {
                let (stream, _) = match acc {
                    Ok(s) => s,
                    Err(e) => { tracing::warn!(error = %e, "accept failed"); continue; }
                };
                let d = driver.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(req, d.clone()));
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await
                    {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
    let _ = std::fs::remove_file(socket);
    tracing::info!("stopped; live sessions stay mounted and are found again on the next start");
    Ok(())
}
