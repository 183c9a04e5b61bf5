//! Running the API over TCP, with background upkeep, until shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rdkafka::consumer::BaseConsumer;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use strata_common::config::ServeConfig;
use strata_common::kafka;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::api::routes;
use crate::app::App;
use crate::state::ServingState;
use crate::{Error, Result};

/// Binds a listen address, failing with an error that names it.
pub async fn bind(addr: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// Binds the listen address (failing clearly if it cannot), then serves until `shutdown`.
pub async fn serve(state: Arc<ServingState>, shutdown: CancellationToken) -> Result<()> {
    let addr = state.cfg.serve.http.clone();
    let listener = bind(&addr).await?;
    let local = listener.local_addr().map_err(|source| Error::Bind {
        addr: addr.clone(),
        source,
    })?;
    let tls = tls_acceptor(&state.cfg.serve)?;
    tracing::info!(addr = %local, https = tls.is_some(), "serving layer listening");
    spawn_upkeep(state.clone(), shutdown.clone());
    match tls {
        None => {
            let stop = shutdown.clone();
            warp::serve(routes(Arc::new(App::new(state))))
                .incoming(listener)
                .graceful(async move { stop.cancelled().await })
                .run()
                .await;
        }
        Some(acceptor) => serve_tls(listener, acceptor, state, shutdown).await,
    }
    tracing::info!("serving layer stopped");
    Ok(())
}

/// The TLS acceptor for `serve.tls-cert` and `serve.tls-key`, if both are set.
pub fn tls_acceptor(cfg: &ServeConfig) -> Result<Option<TlsAcceptor>> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Ok(None);
    };
    let bad = |key: &'static str, reason: String| Error::Tls { key, reason };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<std::result::Result<_, _>>())
        .map_err(|e| bad("serve.tls-cert", format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(bad(
            "serve.tls-cert",
            format!("{}: no certificate in it", cert.display()),
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| bad("serve.tls-key", format!("{}: {e}", key.display())))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("serve.tls-cert", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| {
            bad(
                "serve.tls-key",
                format!("does not match the certificate: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// Serves HTTPS: each connection is a TLS handshake (10 s at most), then HTTP/1.1 over it.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<ServingState>,
    shutdown: CancellationToken,
) {
    let service = warp::service(routes(Arc::new(App::new(state))));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        let stop = shutdown.clone();
        connections.spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(service));
            tokio::pin!(conn);
            let done = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = stop.cancelled() => None,
            };
            let result = match done {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
        while connections.try_join_next().is_some() {}
    }
    // Let answers in flight finish, for a while.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// Keeps the state fresh: follows the speed layer, reloads new batch versions, probes the broker
/// (reachability and high watermarks, for lag).
fn spawn_upkeep(state: Arc<ServingState>, shutdown: CancellationToken) {
    {
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::task::spawn_blocking(move || {
            state.catch_up();
            state.read_live();
            let mut ticks = 0u64;
            while !shutdown.is_cancelled() {
                state.catch_up();
                if ticks.is_multiple_of(10) {
                    if let Err(e) = state.refresh_batch() {
                        tracing::warn!(error = %e, "cannot load the newest batch version");
                    }
                }
                ticks += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }
    tokio::task::spawn_blocking(move || {
        let mut probe: Option<BaseConsumer> = None;
        // Failed probes in a row: past three (6 s), the client is made anew, so that one that
        // outlived a broker restart in a bad way (stale metadata, a connection it keeps
        // retrying) does not keep the layer unready once the broker is back.
        let mut failed = 0u32;
        while !shutdown.is_cancelled() {
            if probe.is_none() {
                match kafka::client_config(&state.cfg.kafka).create() {
                    Ok(p) => probe = Some(p),
                    Err(e) => state.broker_probed(Err(format!("cannot create a client: {e}"))),
                }
            }
            if let Some(p) = &probe {
                let hw = kafka::high_watermarks(p, &state.cfg.kafka.topic)
                    .map_err(|e| e.to_string())
                    .and_then(|hw| {
                        if hw.is_empty() {
                            Err(format!("topic {} not found", state.cfg.kafka.topic))
                        } else {
                            Ok(hw)
                        }
                    });
                failed = if hw.is_ok() { 0 } else { failed + 1 };
                state.broker_probed(hw);
                if failed >= 3 {
                    failed = 0;
                    probe = None;
                }
            }
            for _ in 0..20 {
                if shutdown.is_cancelled() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
}
