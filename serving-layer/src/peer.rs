//! A speed instance's side of a cluster (decision record 0013): the endpoint serving layers pull
//! its partitions from (`GET /v1/speed/sync`), and its record in `<topic>.members`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rocksdb::DB;
use strata_common::cluster::{self, Member};
use strata_common::config::Config;
use strata_common::handoff::Partition;
use strata_common::kafka;
use tokio_util::sync::CancellationToken;
use warp::Filter;

use crate::error::ApiError;
use crate::Result;

/// What the endpoint serves: the instance's id, its state, the partitions it holds now.
pub struct Peer {
    pub id: String,
    pub db: Arc<DB>,
    pub held: Arc<Mutex<Vec<Partition>>>,
}

impl Peer {
    fn held(&self) -> Vec<Partition> {
        self.held.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

#[derive(serde::Deserialize)]
struct SyncQuery {
    #[serde(default)]
    have: String,
}

/// The endpoint's routes: `GET /v1/speed/sync?have=p:next:cutoff,...` answers what the caller
/// lacks of each partition this instance holds (binary, see `strata_common::cluster`).
pub fn routes(
    peer: Arc<Peer>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible> + Clone {
    let sync = warp::path!("v1" / "speed" / "sync")
        .and(warp::get())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and_then(move |raw: String| {
            let peer = peer.clone();
            async move {
                let reply = match answer(&peer, &raw).await {
                    Ok(body) => warp::http::Response::builder()
                        .header("content-type", "application/octet-stream")
                        .body(body.into())
                        .unwrap_or_default(),
                    Err(e) => warp::reply::Reply::into_response(e.reply()),
                };
                Ok::<_, std::convert::Infallible>(reply)
            }
        });
    let unknown = warp::any().map(|| {
        warp::reply::Reply::into_response(
            ApiError::not_found("the speed endpoint serves GET /v1/speed/sync only").reply(),
        )
    });
    sync.or(unknown).unify()
}

async fn answer(peer: &Arc<Peer>, raw: &str) -> std::result::Result<Vec<u8>, ApiError> {
    let q: SyncQuery = serde_urlencoded::from_str(raw)
        .map_err(|e| ApiError::bad_request(format!("query: {e}")))?;
    let have =
        cluster::decode_have(&q.have).map_err(|e| ApiError::bad_request(format!("have: {e}")))?;
    let peer = peer.clone();
    tokio::task::spawn_blocking(move || {
        cluster::sync_response(&peer.db, &peer.id, &peer.held(), &have)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::from)
}

/// Serves the endpoint on `speed.http` and keeps the instance's record in `<topic>.members`
/// (every 5 s, removed when it stops) until `shutdown`.
pub async fn run(cfg: Config, peer: Arc<Peer>, shutdown: CancellationToken) -> Result<()> {
    let (Some(addr), Some(url)) = (cfg.speed.http.clone(), cfg.speed_url()) else {
        return Ok(());
    };
    let listener = crate::server::bind(&addr).await?;
    tracing::info!(addr = %addr, url = %url, id = %peer.id, "speed endpoint listening");
    let topic = cluster::members_topic(&cfg.kafka.topic);
    let announce = {
        let (kafka_cfg, shutdown, id) = (cfg.kafka.clone(), shutdown.clone(), peer.id.clone());
        tokio::task::spawn_blocking(move || announce(&kafka_cfg, &topic, &id, &url, &shutdown))
    };
    let stop = shutdown.clone();
    warp::serve(routes(peer))
        .incoming(listener)
        .graceful(async move { stop.cancelled().await })
        .run()
        .await;
    announce
        .await
        .map_err(|e| strata_common::Error::Other(format!("the members record: {e}")))??;
    Ok(())
}

/// Publishes the instance's [`Member`] record every 5 s, and removes it when `shutdown` comes.
fn announce(
    cfg: &strata_common::config::KafkaConfig,
    topic: &str,
    id: &str,
    url: &str,
    shutdown: &CancellationToken,
) -> strata_common::Result<()> {
    let producer: ThreadedProducer<_> = kafka::client_config(cfg)
        .create()
        .map_err(|e| strata_common::Error::kafka("create the members producer", e))?;
    while !shutdown.is_cancelled() {
        let member = Member {
            id: id.to_string(),
            url: url.to_string(),
            at: strata_common::time::now_millis(),
        };
        let payload = serde_json::to_vec(&member)
            .map_err(|e| strata_common::Error::Other(format!("encode the member: {e}")))?;
        if let Err((e, _)) = producer.send(BaseRecord::to(topic).key(id).payload(&payload)) {
            tracing::warn!(error = %e, "cannot publish the members record; retrying");
        }
        for _ in 0..50 {
            if shutdown.is_cancelled() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // A record without a value removes the instance.
    let gone: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).key(id);
    if let Err((e, _)) = producer.send(gone) {
        tracing::warn!(error = %e, "cannot remove the members record");
    }
    if let Err(e) = producer.flush(Duration::from_secs(2)) {
        tracing::warn!(error = %e, "the members record's removal was not acknowledged");
    }
    Ok(())
}
