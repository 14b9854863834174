//! The web console's static assets, embedded in the binary and served by the management
//! listener: the page at `/`, its script and style under `/console/`, and the vendored
//! libraries (with their licences) under `/console/vendor/`. Nothing is built or installed at
//! run time; the console itself talks only to the management API, with the caller's login.

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// (path under /console/, content type, bytes)
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../console/app.css"),
    ),
    (
        "vendor/uplot-1.6.32/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/vendor/uplot-1.6.32/uPlot.iife.min.js"),
    ),
    (
        "vendor/uplot-1.6.32/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../console/vendor/uplot-1.6.32/uPlot.min.css"),
    ),
    (
        "vendor/uplot-1.6.32/LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../console/vendor/uplot-1.6.32/LICENSE"),
    ),
];

const INDEX: &[u8] = include_bytes!("../console/index.html");

/// Headers every console response carries: no framing by other sites, no sniffing, and
/// scripts only from this origin.
fn secured(status: StatusCode, content_type: &str, body: &'static [u8]) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, content_type),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub async fn index() -> Response {
    secured(StatusCode::OK, "text/html; charset=utf-8", INDEX)
}

pub async fn asset(Path(path): Path<String>) -> Response {
    match ASSETS.iter().find(|(p, _, _)| *p == path) {
        Some((_, ct, body)) => secured(StatusCode::OK, ct, body),
        None => secured(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            b"not found\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_only_embedded_assets() {
        let page = std::str::from_utf8(INDEX).unwrap();
        for src in page.split("/console/").skip(1) {
            let path = src.split('"').next().unwrap();
            assert!(
                ASSETS.iter().any(|(p, _, _)| *p == path),
                "index.html names /console/{path}, which is not embedded"
            );
        }
    }
}
