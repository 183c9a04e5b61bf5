//! The live dashboard: one self-contained HTML page (inline CSS and JavaScript, nothing fetched
//! from elsewhere) served at `GET /`. The page polls the JSON API every 2 s; it holds no state of
//! its own on the server.

use warp::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, X_CONTENT_TYPE_OPTIONS};
use warp::{Filter, Rejection, Reply};

/// The page, embedded at build time.
pub const PAGE: &str = include_str!("../assets/dashboard.html");

/// The page may run its own inline script and styles and call this origin's API; nothing else.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// `GET /`: the dashboard, as `text/html; charset=utf-8`.
pub fn route() -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    warp::path::end().and(warp::get()).map(|| {
        let page = warp::reply::html(PAGE);
        let page = warp::reply::with_header(page, CACHE_CONTROL, "no-cache");
        let page = warp::reply::with_header(page, X_CONTENT_TYPE_OPTIONS, "nosniff");
        warp::reply::with_header(page, CONTENT_SECURITY_POLICY, CSP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        // The only URL in the page is the SVG namespace, which is a name, not a request.
        let rest = PAGE.replace("http://www.w3.org/2000/svg", "");
        for needle in ["http://", "https://", "//cdn", "@import", "url("] {
            assert!(!rest.contains(needle), "the page refers to {needle:?}");
        }
    }
}
