//! TLS for AMQP (AMQPS, RabbitMQ's 5671) with rustls: the server configuration built from
//! `--tls-cert`, `--tls-key` and `--tls-ca` (PEM files), and the identity of a client that
//! presented a certificate, for SASL EXTERNAL (the user is the certificate's CN, as RabbitMQ's
//! `rabbitmq_auth_mechanism_ssl` with its default `ssl_cert_login_from = distinguished_name`
//! variant `common_name`).
//!
//! With `--tls-ca`, client certificates are verified against it when presented; a client
//! without one may still log in with a password (RabbitMQ's `verify_peer` with
//! `fail_if_no_peer_cert = false`).

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use warren_core::config::Config;

fn certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(io::Error::other(format!(
            "{}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// The rustls configuration the settings ask for; None when TLS is not configured.
pub fn server_config(cfg: &Config) -> io::Result<Option<Arc<ServerConfig>>> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        if cfg.tls_cert.is_some() || cfg.tls_key.is_some() {
            return Err(io::Error::other("--tls-cert and --tls-key go together"));
        }
        return Ok(None);
    };
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| io::Error::other(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
    let builder = match &cfg.tls_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| io::Error::other(format!("{}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| io::Error::other(format!("TLS client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| io::Error::other(format!("TLS certificate and key: {e}")))?;
    Ok(Some(Arc::new(config)))
}

/// The common name of a verified client certificate.
pub fn peer_common_name(conn: &rustls::ServerConnection) -> Option<String> {
    let cert = conn.peer_certificates()?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// What a TLS connection tells the rest of the connection code.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// The verified client certificate's CN, for SASL EXTERNAL.
    pub peer_cn: Option<String>,
    pub protocol: Option<String>,
    pub cipher: Option<String>,
}

impl TlsInfo {
    pub fn of(conn: &rustls::ServerConnection) -> TlsInfo {
        TlsInfo {
            peer_cn: peer_common_name(conn),
            protocol: conn.protocol_version().map(|v| format!("{v:?}")),
            cipher: conn
                .negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite())),
        }
    }
}
