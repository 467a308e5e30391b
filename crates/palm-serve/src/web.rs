//! The pages, embedded in the binary: plain HTML, CSS and JavaScript with no build step.
//!
//! Every page loads `/static/app.js` (login, header, a safe DOM builder: model text is only ever
//! set as text) and its own script. Responses carry a Content-Security-Policy that allows
//! scripts and styles from this origin only (no inline script), and no framing.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::server::{ApiError, AppState};

/// (URL path, content type, body)
const FILES: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("web/index.html"),
    ),
    (
        "/label",
        "text/html; charset=utf-8",
        include_str!("web/label.html"),
    ),
    (
        "/write",
        "text/html; charset=utf-8",
        include_str!("web/write.html"),
    ),
    (
        "/admin",
        "text/html; charset=utf-8",
        include_str!("web/admin.html"),
    ),
    (
        "/static/app.css",
        "text/css; charset=utf-8",
        include_str!("web/app.css"),
    ),
    (
        "/static/app.js",
        "text/javascript; charset=utf-8",
        include_str!("web/app.js"),
    ),
    (
        "/static/chat.js",
        "text/javascript; charset=utf-8",
        include_str!("web/chat.js"),
    ),
    (
        "/static/label.js",
        "text/javascript; charset=utf-8",
        include_str!("web/label.js"),
    ),
    (
        "/static/write.js",
        "text/javascript; charset=utf-8",
        include_str!("web/write.js"),
    ),
    (
        "/static/admin.js",
        "text/javascript; charset=utf-8",
        include_str!("web/admin.js"),
    ),
];

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub fn routes() -> Router<AppState> {
    let mut r = Router::new();
    for &(path, ct, body) in FILES {
        r = r.route(path, get(move || async move { page(ct, body) }));
    }
    r.route(
        "/static/{*rest}",
        get(|| async { ApiError::not_found("no such file") }),
    )
}
