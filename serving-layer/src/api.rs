//! Routes: one function builds them all, so tests can call them in-process and the server can
//! serve them over TCP.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};
use strata_common::batch_store;
use strata_common::config::Config;
use warp::http::{HeaderValue, Method, StatusCode};
use warp::{Filter, Rejection, Reply};

use strata_common::views::{Basis, Gran};

use crate::answers::Answer;
use crate::app::App;
use crate::error::ApiError;
use crate::insights::{self, Window};
use crate::state::ServingState;
use crate::{devices, query, recommend};

type Params = HashMap<String, String>;

/// The OpenAPI document of these routes.
pub const OPENAPI: &str = include_str!("../assets/openapi.json");

/// Longest path plus query string accepted, in bytes.
pub const MAX_URL_BYTES: usize = 8 * 1024;
/// Largest request body accepted, in bytes (no route reads more than a few bytes).
pub const MAX_BODY_BYTES: u64 = 64 * 1024;

#[derive(Debug)]
struct UrlTooLong(usize);
impl warp::reject::Reject for UrlTooLong {}

#[derive(Debug)]
struct BodyTooLarge(u64);
impl warp::reject::Reject for BodyTooLarge {}

#[derive(Debug)]
struct NeedsReadKey;
impl warp::reject::Reject for NeedsReadKey {}

/// With `serve.read-key` set, the read routes (`/v1/*` but admin and the OpenAPI document) need
/// `Authorization: Bearer <read key or admin key>`.
fn read_key(state: &ServingState) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    let keys = state.cfg.serve.read_key.clone().map(|read| {
        let admin = state.cfg.serve.admin_key.clone();
        Arc::new((read, admin))
    });
    warp::path::full()
        .and(header("authorization"))
        .and_then(move |path: warp::path::FullPath, auth: Option<String>| {
            let let_in = keys.as_deref().is_none_or(|(read, admin)| {
                let p = path.as_str();
                let guarded = p.starts_with("/v1/")
                    && !p.starts_with("/v1/admin/")
                    && p != "/v1/openapi.json";
                let given = auth
                    .as_deref()
                    .and_then(|h| h.strip_prefix("Bearer "))
                    .unwrap_or("");
                !guarded
                    || constant_time_eq(given.as_bytes(), read.as_bytes())
                        | admin
                            .as_deref()
                            .is_some_and(|a| constant_time_eq(given.as_bytes(), a.as_bytes()))
            });
            async move {
                if let_in {
                    Ok(())
                } else {
                    Err(warp::reject::custom(NeedsReadKey))
                }
            }
        })
        .untuple_one()
}

/// A 405 names the methods its path does answer (`Allow`); where no route has the path at all,
/// the answer is a 404.
fn allow(path: &str, mut reply: warp::reply::Response) -> warp::reply::Response {
    if reply.status() != StatusCode::METHOD_NOT_ALLOWED {
        return reply;
    }
    let methods = crate::metrics::allowed_methods(path);
    if methods.is_empty() {
        return ApiError::not_found("no such route").reply().into_response();
    }
    if let Ok(v) = HeaderValue::from_str(&methods.join(", ")) {
        reply.headers_mut().insert("allow", v);
    }
    reply
}

/// Adds CORS headers for allowed origins, and answers their preflight requests.
fn cors(
    allowed: &[String],
    origin: Option<String>,
    preflight: bool,
    method: &Method,
    reply: impl Reply,
) -> warp::reply::Response {
    let origin = origin
        .filter(|o| allowed.iter().any(|a| a == "*" || a == o))
        .and_then(|o| HeaderValue::from_str(&o).ok());
    let Some(origin) = origin else {
        return reply.into_response();
    };
    let mut res = if method == Method::OPTIONS && preflight {
        let mut r = warp::reply::Response::new(Vec::new().into());
        *r.status_mut() = StatusCode::NO_CONTENT;
        let h = r.headers_mut();
        h.insert(
            "access-control-allow-methods",
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            "access-control-allow-headers",
            HeaderValue::from_static("authorization, content-type"),
        );
        h.insert("access-control-max-age", HeaderValue::from_static("600"));
        r
    } else {
        reply.into_response()
    };
    let h = res.headers_mut();
    h.insert("access-control-allow-origin", origin);
    h.insert("vary", HeaderValue::from_static("Origin"));
    res
}

/// Rejects, before any route runs, URLs longer than [`MAX_URL_BYTES`] and bodies declared
/// larger than [`MAX_BODY_BYTES`].
fn limits() -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::path::full()
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::optional::<String>("content-length"))
        .and_then(
            |path: warp::path::FullPath, query: String, length: Option<String>| async move {
                let url = path.as_str().len() + query.len();
                if url > MAX_URL_BYTES {
                    return Err(warp::reject::custom(UrlTooLong(url)));
                }
                if let Some(l) = length {
                    let n = l.trim().parse::<u64>().unwrap_or(u64::MAX);
                    if n > MAX_BODY_BYTES {
                        return Err(warp::reject::custom(BodyTooLarge(n)));
                    }
                }
                Ok(())
            },
        )
        .untuple_one()
}

/// A request header's value; absent when it is missing or not text.
fn header(
    name: &'static str,
) -> impl Filter<Extract = (Option<String>,), Error = Infallible> + Clone {
    warp::header::optional::<String>(name)
        .or(warp::any().map(|| None))
        .unify()
}

/// The query parameters of a URL (`path?query`), as a map (a name given twice: the last value).
fn params(url: &str) -> Result<Params, ApiError> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    serde_urlencoded::from_str(query)
        .map_err(|e| ApiError::bad_request(format!("bad query string: {e}")))
}

/// The request's path and query string: with the state's tag, what a kept answer is found by.
fn url() -> impl Filter<Extract = (String,), Error = Infallible> + Clone {
    warp::path::full()
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .map(|path: warp::path::FullPath, query: String| {
            if query.is_empty() {
                path.as_str().to_owned()
            } else {
                format!("{}?{query}", path.as_str())
            }
        })
}

/// Every route of the API, with errors rendered as JSON.
///
/// Routes are grouped by their leading path segments, most asked first, so a request is compared
/// with a few prefixes rather than with every route before its own. Query parameters are parsed
/// only when an answer is computed: a kept answer is found by the URL alone.
pub fn routes(state: Arc<App>) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let observer = state.clone();
    let cors_origins = Arc::new(state.cfg.serve.cors_origins.clone());
    let guard = read_key(&state);
    let st = {
        let state = state.clone();
        warp::any().map(move || state.clone())
    };

    let item = warp::path!("items" / String)
        .and(warp::get())
        .and(url())
        .and(st.clone())
        .and_then(|item: String, url: String, s: Arc<App>| {
            answer_now(s, url, move |s| {
                query::item(s, &id_segment(s, &item, "item")?)
            })
        });
    let top = warp::path!("top-items")
        .and(warp::get())
        .and(url())
        .and(st.clone())
        .and_then(|url: String, s: Arc<App>| {
            answer(s, url, Clock::Read, |s, p| {
                let limit = limit(p, s.cfg.serve.max_limit)?;
                let t = p.get("type").map_or("purchase", String::as_str);
                let window = Window::parse(p.get("window").map_or("all", String::as_str))?;
                let category = id_param(s, p, "category")?;
                insights::top_items(s, &s.windows, t, window, category, limit)
            })
        });
    let trending = warp::path!("trending")
        .and(warp::get())
        .and(url())
        .and(st.clone())
        .and_then(|url: String, s: Arc<App>| {
            answer(s, url, Clock::Read, |s, p| {
                let limit = limit(p, s.cfg.serve.max_limit)?;
                let t = p.get("type").map_or("view", String::as_str);
                let window = Window::parse(p.get("window").map_or("1h", String::as_str))?;
                let baseline = Window::parse(p.get("baseline").map_or("7d", String::as_str))?;
                let min_support = number(p, "min_support", 5, 1, MAX_MIN_SUPPORT)? as u64;
                insights::trending(s, &s.windows, t, window, baseline, min_support, limit)
            })
        });
    let timeseries = warp::path!("timeseries")
        .and(warp::get())
        .and(url())
        .and(st.clone())
        .and_then(|url: String, s: Arc<App>| {
            answer(s, url, Clock::Read, |s, p| {
                let bucket = p.get("bucket").map_or("hour", String::as_str);
                let q = insights::SeriesQuery {
                    metric: insights::Metric::parse(
                        p.get("metric").map_or("events", String::as_str),
                    )?,
                    event_type: p.get("type").cloned(),
                    item: id_param(s, p, "item")?.map(str::to_string),
                    gran: Gran::parse(bucket).ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "bucket must be minute, hour or day; got {bucket:?}"
                        ))
                    })?,
                    from: p.get("from").cloned(),
                    to: p.get("to").cloned(),
                };
                insights::timeseries(s, &q)
            })
        });
    let item_recs = warp::path!("items" / String)
        .and(warp::get())
        .and(url())
        .and(st.clone())
        .and_then(|item: String, url: String, s: Arc<App>| {
            answer(s, url, Clock::Unread, move |s, p| {
                let limit = limit(p, s.cfg.serve.max_limit)?;
                let b = p.get("basis").map_or("purchase", String::as_str);
                let basis = Basis::parse(b).ok_or_else(|| {
                    ApiError::bad_request(format!("basis must be purchase or view; got {b:?}"))
                })?;
                recommend::for_item(s, &s.co_rows, &id_segment(s, &item, "item")?, basis, limit)
            })
        });
    let user_recs = warp::path!("users" / String)
        .and(warp::get())
        .and(url())
        .and(st.clone())
        .and_then(|user: String, url: String, s: Arc<App>| {
            answer(s, url, Clock::Unread, move |s, p| {
                let limit = limit(p, s.cfg.serve.max_limit)?;
                recommend::for_user(
                    s,
                    &s.co_rows,
                    &s.windows,
                    &id_segment(s, &user, "user")?,
                    limit,
                )
            })
        });
    let fleet = warp::path!("health")
        .and(warp::get())
        .and(url())
        .and(st.clone())
        .and_then(|url: String, s: Arc<App>| answer(s, url, Clock::Read, |s, _| devices::fleet(s)));
    let device = warp::path!(String / "health")
        .and(warp::get())
        .and(url())
        .and(st.clone())
        .and_then(|device: String, url: String, s: Arc<App>| {
            answer(s, url, Clock::Read, move |s, p| {
                let hours = number(p, "hours", 24, 1, MAX_DEVICE_HOURS)?;
                devices::device(s, &id_segment(s, &device, "device")?, hours)
            })
        });
    let status = warp::path!("status")
        .and(warp::get())
        .and(st.clone())
        .map(|s: Arc<App>| render(query::status(&s)));
    let admin_batch = warp::path!("batch")
        .and(warp::post())
        .and(warp::header::optional::<String>("authorization"))
        .and(st.clone())
        .map(|auth: Option<String>, s: Arc<App>| {
            let r = authorize(&s, auth.as_deref()).and_then(|()| {
                let id = batch_store::request_run(&s.cfg.data_dir)?;
                Ok(json!({"run_id": id, "status": "requested"}))
            });
            match r {
                Ok(v) => warp::reply::with_status(warp::reply::json(&v), StatusCode::ACCEPTED)
                    .into_response(),
                Err(e) => e.reply().into_response(),
            }
        });
    let admin_run = warp::path!("batch" / String)
        .and(warp::get())
        .and(warp::header::optional::<String>("authorization"))
        .and(st.clone())
        .map(|id: String, auth: Option<String>, s: Arc<App>| {
            let r = authorize(&s, auth.as_deref()).and_then(|()| {
                match batch_store::read_run(&s.cfg.data_dir, &id)? {
                    Some(run) => serde_json::to_value(run).map_err(ApiError::internal),
                    None => Err(ApiError::not_found(format!("no batch run {id:?}"))),
                }
            });
            render(r)
        });
    let admin_views = warp::path!("views")
        .and(warp::get())
        .and(warp::header::optional::<String>("authorization"))
        .and(st.clone())
        .and_then(|auth: Option<String>, s: Arc<App>| async move {
            let r = match authorize(&s, auth.as_deref()) {
                Ok(()) => tokio::task::spawn_blocking(move || query::snapshot(&s))
                    .await
                    .unwrap_or_else(|e| Err(ApiError::internal(e))),
                Err(e) => Err(e),
            };
            Ok::<_, Infallible>(match r {
                Ok(snap) => warp::http::Response::builder()
                    .header("content-type", "application/octet-stream")
                    .body(snap.encode())
                    .map(Reply::into_response)
                    .unwrap_or_else(|e| ApiError::internal(e).reply().into_response()),
                Err(e) => e.reply().into_response(),
            })
        });
    // Built once; each answer shares its bytes.
    let document = Bytes::from(openapi(&state.cfg));
    let openapi = warp::path!("openapi.json")
        .and(warp::get())
        .map(move || json_body(document.clone()));
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(st.clone())
        .and_then(|s: Arc<App>| async move {
            let text = tokio::task::spawn_blocking(move || {
                crate::metrics::render(&s, &s.answers, &s.http_metrics)
            })
            .await
            .unwrap_or_default();
            Ok::<_, Infallible>(
                warp::reply::with_header(
                    text,
                    "content-type",
                    "text/plain; version=0.0.4; charset=utf-8",
                )
                .into_response(),
            )
        });
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&json!({"status": "ok"})).into_response());
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(st)
        .map(|s: Arc<App>| match s.ready() {
            Ok(()) => warp::reply::json(&json!({"status": "ready"})).into_response(),
            Err(why) => ApiError::unavailable(why).reply().into_response(),
        });
    let dashboard = crate::dashboard::route().map(Reply::into_response);

    // warp copies, for every request, what follows each `and` and every alternative after the
    // first: each group is boxed, so that copy is one reference count rather than every route.
    let reads = guard.and(
        warp::path("recommendations")
            .and(user_recs.or(item_recs).unify().boxed())
            .or(item)
            .unify()
            .or(warp::path("insights").and(top.or(trending).unify().or(timeseries).unify().boxed()))
            .unify()
            .or(warp::path("devices").and(fleet.or(device).unify().boxed()))
            .unify()
            .or(status)
            .unify()
            .boxed(),
    );
    let admin = warp::path("admin").and(
        admin_batch
            .or(admin_run)
            .unify()
            .or(admin_views)
            .unify()
            .boxed(),
    );
    let v1 = warp::path("v1").and(reads.or(openapi).unify().or(admin).unify().boxed());
    let all = v1
        .or(metrics)
        .unify()
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .or(dashboard)
        .unify()
        .boxed();
    let served = limits().and(all).recover(rejection).unify();
    header("origin")
        .and(header("access-control-request-method"))
        .and(warp::method())
        .and(warp::path::full())
        .and(served)
        .map(
            move |origin: Option<String>,
                  preflight: Option<String>,
                  method: Method,
                  path: warp::path::FullPath,
                  reply: warp::reply::Response| {
                let reply = allow(path.as_str(), reply);
                cors(&cors_origins, origin, preflight.is_some(), &method, reply)
            },
        )
        .with(warp::log::custom(move |info| {
            observer.http_metrics.observe(
                info.path(),
                info.status().as_u16(),
                info.elapsed().as_secs_f64(),
            );
            tracing::debug!(method = %info.method(), path = info.path(), status = info.status().as_u16(), ms = info.elapsed().as_secs_f64() * 1e3, "request");
        }))
}

/// Whether a route's answer depends on the wall clock (windows ending now, device status by
/// age): such answers are kept for the second they were computed in only.
#[derive(Clone, Copy)]
enum Clock {
    Unread,
    Read,
}

impl Clock {
    fn second(self) -> Option<i64> {
        match self {
            Clock::Unread => None,
            Clock::Read => Some(strata_common::time::now_millis().div_euclid(1000)),
        }
    }
}

/// Answers from the kept answers when the state has not moved since one was computed (see
/// [`crate::answers`]); otherwise runs the query off the async threads, taking its turn among
/// the heavy queries, and keeps what it renders.
async fn answer(
    state: Arc<App>,
    url: String,
    clock: Clock,
    f: impl FnOnce(&App, &Params) -> Result<Value, ApiError> + Send + 'static,
) -> Result<warp::reply::Response, Infallible> {
    if let Some(kept) = state.answers.get(state.state_id(), &url, clock.second()) {
        return Ok(json_body(kept));
    }
    let result = match state.heavy.acquire().await {
        Ok(_permit) => {
            // A request for the same URL may have computed it while this one waited its turn.
            if let Some(kept) = state.answers.get(state.state_id(), &url, clock.second()) {
                return Ok(json_body(kept));
            }
            let s = state.clone();
            tokio::task::spawn_blocking(move || compute(&s, &url, clock, f))
                .await
                .unwrap_or_else(|e| Err(ApiError::internal(e)))
        }
        Err(e) => Err(ApiError::internal(e)),
    };
    Ok(render_body(result))
}

/// Runs a point lookup (a handful of key reads: microseconds) on the async thread itself:
/// handing it to the blocking pool costs more in thread switches than the query.
async fn answer_now(
    state: Arc<App>,
    url: String,
    f: impl FnOnce(&App) -> Result<Value, ApiError>,
) -> Result<warp::reply::Response, Infallible> {
    if let Some(kept) = state.answers.get(state.state_id(), &url, None) {
        return Ok(json_body(kept));
    }
    Ok(render_body(compute(&state, &url, Clock::Unread, |s, _| {
        f(s)
    })))
}

/// Computes and renders an answer from the URL's query parameters, and keeps it if neither the
/// state nor (for an answer that reads the clock) the second moved meanwhile.
fn compute(
    state: &App,
    url: &str,
    clock: Clock,
    f: impl FnOnce(&App, &Params) -> Result<Value, ApiError>,
) -> Result<Bytes, ApiError> {
    let (tag, second) = (state.state_id(), clock.second());
    let params = params(url)?;
    let answer = Answer::render(f(state, &params)?).map_err(ApiError::internal)?;
    state.answers.computed();
    let body = answer.body();
    if state.state_id() == tag && clock.second() == second {
        state.answers.put(tag, url, second, answer);
    }
    Ok(body)
}

fn json_body(body: Bytes) -> warp::reply::Response {
    let mut res = warp::reply::Response::new(body.into());
    res.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

fn render_body(result: Result<Bytes, ApiError>) -> warp::reply::Response {
    match result {
        Ok(body) => json_body(body),
        Err(e) => e.reply().into_response(),
    }
}

fn render(result: Result<Value, ApiError>) -> warp::reply::Response {
    match result {
        Ok(v) => warp::reply::json(&v).into_response(),
        Err(e) => e.reply().into_response(),
    }
}

fn limit(p: &Params, max: usize) -> Result<usize, ApiError> {
    match p.get("limit") {
        None => Ok(10.min(max)),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(format!(
                "limit must be a whole number from 1 to {max}; got {s:?}"
            ))),
        },
    }
}

/// An integer parameter with a default and bounds.
fn number(p: &Params, name: &str, default: i64, min: i64, max: i64) -> Result<i64, ApiError> {
    match p.get(name) {
        None => Ok(default),
        Some(s) => match s.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(format!(
                "{name} must be a whole number from {min} to {max}; got {s:?}"
            ))),
        },
    }
}

/// Largest `min_support` of trending items.
pub const MAX_MIN_SUPPORT: i64 = 1_000_000;
/// Most hours of one device's health.
pub const MAX_DEVICE_HOURS: i64 = 168;

/// The OpenAPI document with this server's own limits in it: `limit` up to `serve.max-limit`,
/// identifiers up to `validation.max-id-bytes`.
pub fn openapi(cfg: &Config) -> String {
    let Ok(mut doc) = serde_json::from_str::<Value>(OPENAPI) else {
        return OPENAPI.to_string();
    };
    let ids = ["item", "user", "device", "category"];
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for op in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in op.values_mut() {
                let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) else {
                    continue;
                };
                for param in params {
                    let name = param["name"].as_str().unwrap_or_default().to_string();
                    let schema = &mut param["schema"];
                    if name == "limit" {
                        schema["maximum"] = json!(cfg.serve.max_limit);
                    } else if ids.contains(&name.as_str()) {
                        schema["minLength"] = json!(1);
                        schema["maxLength"] = json!(cfg.validation.max_id_bytes.max(1));
                    }
                }
            }
        }
    }
    doc.to_string()
}

/// A path segment naming an item, user or device: percent-decoded, and no longer than any
/// identifier an event may carry (`validation.max-id-bytes`; in characters, so that a client
/// counting characters, as JSON Schema's `maxLength` does, is never refused a shorter one).
fn id_segment(s: &ServingState, raw: &str, what: &str) -> Result<String, ApiError> {
    let id = decode_segment(raw)?;
    check_id(s, &id, what)?;
    Ok(id)
}

/// An optional identifier in the query string, checked like [`id_segment`].
fn id_param<'a>(s: &ServingState, p: &'a Params, name: &str) -> Result<Option<&'a str>, ApiError> {
    match p.get(name) {
        None => Ok(None),
        Some(v) => check_id(s, v, name).map(|()| Some(v.as_str())),
    }
}

fn check_id(s: &ServingState, id: &str, what: &str) -> Result<(), ApiError> {
    let max = s.cfg.validation.max_id_bytes.max(1);
    if id.is_empty() || id.chars().count() > max {
        return Err(ApiError::bad_request(format!(
            "{what} must be 1 to {max} characters long; got {}",
            id.chars().count()
        )));
    }
    Ok(())
}

/// Percent-decodes one path segment.
fn decode_segment(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ApiError::bad_request("bad percent-encoding in the path"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::bad_request("the path is not UTF-8"))
}

fn authorize(state: &ServingState, header: Option<&str>) -> Result<(), ApiError> {
    let Some(key) = state.cfg.serve.admin_key.as_deref() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "no admin key is configured (set --admin-key or STRATA_ADMIN_KEY)",
        ));
    };
    let given = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
    if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "admin routes need Authorization: Bearer <admin key>",
        ));
    }
    Ok(())
}

/// Compares without returning early, so the time taken does not tell how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for (i, &x) in a.iter().enumerate() {
        diff |= x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0);
    }
    diff == 0
}

async fn rejection(r: Rejection) -> Result<warp::reply::Response, Infallible> {
    let e = if r.find::<NeedsReadKey>().is_some() {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "read routes need Authorization: Bearer <read key> on this server",
        )
    } else if let Some(UrlTooLong(n)) = r.find() {
        ApiError::new(
            StatusCode::URI_TOO_LONG,
            "url_too_long",
            format!("the URL is {n} bytes; at most {MAX_URL_BYTES} are accepted"),
        )
    } else if let Some(BodyTooLarge(n)) = r.find() {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is {n} bytes; at most {MAX_BODY_BYTES} are accepted"),
        )
    } else if r.is_not_found() {
        ApiError::not_found("no such route")
    } else if let Some(e) = r.find::<warp::reject::InvalidQuery>() {
        ApiError::bad_request(format!("bad query string: {e}"))
    } else if r.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route",
        )
    } else if r.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "request body too large",
        )
    } else {
        ApiError::bad_request(format!("bad request: {r:?}"))
    };
    Ok(e.reply().into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_matches_only_equal() {
        assert!(constant_time_eq(b"secret-key", b"secret-key"));
        assert!(!constant_time_eq(b"secret-kez", b"secret-key"));
        assert!(!constant_time_eq(b"secret", b"secret-key"));
        assert!(!constant_time_eq(b"", b"secret-key"));
    }

    #[test]
    fn segments_are_percent_decoded() {
        assert_eq!(decode_segment("a%20b").ok().as_deref(), Some("a b"));
        assert!(decode_segment("a%2").is_err());
    }

    #[test]
    fn parameters_come_from_the_query_string() {
        let p = params("/v1/insights/top-items?limit=5&type=view&limit=7&category=a%20b")
            .expect("parsed");
        assert_eq!(
            p.get("limit").map(String::as_str),
            Some("7"),
            "the last value"
        );
        assert_eq!(p.get("category").map(String::as_str), Some("a b"));
        assert_eq!(p.len(), 3);
        assert!(params("/v1/items/i1").expect("no query").is_empty());
    }

    #[test]
    fn limits_are_capped() {
        let p = |v: &str| Params::from([("limit".to_string(), v.to_string())]);
        assert_eq!(limit(&Params::new(), 1000).ok(), Some(10));
        assert_eq!(limit(&p("5"), 1000).ok(), Some(5));
        assert!(limit(&p("0"), 1000).is_err());
        assert!(limit(&p("1001"), 1000).is_err());
        assert!(limit(&p("ten"), 1000).is_err());
    }
}
