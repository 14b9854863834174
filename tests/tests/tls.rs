//! AMQPS: AMQP over TLS with certificates generated at test time (rcgen): the handshake, a
//! PLAIN login over TLS, SASL EXTERNAL as the client certificate's CN, and a client whose
//! certificate no CA vouches for; the management API over HTTPS with the same certificate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use warren_protocol::codec::{Decoder, Frame};
use warren_protocol::encode::encode_frame;
use warren_protocol::protocol::{connection, AMQPClass};
use warren_protocol::LongString;

struct Pki {
    dir: PathBuf,
    ca_pem: String,
    ca: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("warren-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "warren test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = cert.pem();
        std::fs::write(dir.join("ca.pem"), &ca_pem).unwrap();
        Pki {
            dir,
            ca_pem,
            ca: Issuer::new(params, key),
        }
    }

    /// A certificate signed by the CA: (cert PEM, key PEM).
    fn issue(&self, cn: &str, sans: &[&str]) -> (String, String) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(&self, name: &str, pem: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    }
}

fn client_config(pki: &Pki, client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile(&pki.ca_pem) {
        roots.add(c).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match client {
        Some((cert, key)) => {
            use rustls::pki_types::pem::PemObject;
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            b.with_client_auth_cert(rustls_pemfile(cert), key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    Arc::new(cfg)
}

fn rustls_pemfile(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

async fn tls_broker(pki: &Pki, with_ca: bool) -> warren_broker::Running {
    let (cert, key) = pki.issue("localhost", &["localhost", "127.0.0.1"]);
    let cert = pki.write("server.pem", &cert);
    let key = pki.write("server.key", &key);
    let ca = pki.dir.join("ca.pem");
    broker_with(move |c| {
        c.amqps_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
        c.tls_ca = with_ca.then_some(ca);
    })
    .await
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect_tls(
    b: &warren_broker::Running,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(b.amqps.unwrap()).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
}

/// Reads frames until `want` matches one; returns it.
async fn read_until<T>(
    s: &mut Tls,
    buf: &mut bytes::BytesMut,
    mut want: impl FnMut(&Frame) -> Option<T>,
) -> T {
    let d = Decoder::new(0);
    loop {
        while let Some(f) = d.decode(buf).unwrap() {
            if let Some(t) = want(&f) {
                return t;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(buf))
            .await
            .expect("in time")
            .unwrap();
        assert!(n > 0, "closed early");
    }
}

/// Runs the AMQP handshake over TLS with `mechanism`; returns the mechanisms the server
/// offered and the outcome (open-ok or the close's code and text).
async fn handshake(
    s: &mut Tls,
    mechanism: &str,
    response: &[u8],
) -> (String, Result<(), (u16, String)>) {
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let mechs = read_until(s, &mut buf, |f| match f {
        Frame::Method {
            class: AMQPClass::Connection(connection::AMQPMethod::Start(st)),
            ..
        } => Some(String::from_utf8_lossy(st.mechanisms.as_bytes()).into_owned()),
        _ => None,
    })
    .await;
    let mut v = Vec::new();
    let mut caps = warren_protocol::FieldTable::default();
    caps.insert(
        "authentication_failure_close".into(),
        warren_protocol::AMQPValue::Boolean(true),
    );
    let mut props = warren_protocol::FieldTable::default();
    props.insert(
        "capabilities".into(),
        warren_protocol::AMQPValue::FieldTable(caps),
    );
    for m in [
        connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: props,
            mechanism: mechanism.into(),
            response: LongString::from(response),
            locale: "en_US".into(),
        }),
        connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 2047,
            frame_max: 131072,
            heartbeat: 0,
        }),
        connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        }),
    ] {
        encode_frame(&mut v, 0, &AMQPClass::Connection(m)).unwrap();
    }
    s.write_all(&v).await.unwrap();
    let outcome = read_until(s, &mut buf, |f| match f {
        Frame::Method {
            class: AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)),
            ..
        } => Some(Ok(())),
        Frame::Method {
            class: AMQPClass::Connection(connection::AMQPMethod::Close(c)),
            ..
        } => Some(Err((c.reply_code, c.reply_text.to_string()))),
        _ => None,
    })
    .await;
    (mechs, outcome)
}

fn cleanup(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_plain_and_external_logins() {
    let pki = Pki::new("ext");
    let b = tls_broker(&pki, true).await;
    // No client certificate: PLAIN over TLS; EXTERNAL is not offered.
    let mut s = connect_tls(&b, client_config(&pki, None)).await.unwrap();
    let (mechs, outcome) = handshake(&mut s, "PLAIN", b"\0guest\0guest").await;
    assert_eq!(mechs, "PLAIN AMQPLAIN");
    assert_eq!(outcome, Ok(()));
    // The management view marks the connection as TLS.
    assert!(b.broker.connections.all().iter().any(|c| c.tls));
    // A client certificate with CN=guest: EXTERNAL logs in as guest, with no password.
    let (cert, key) = pki.issue("guest", &[]);
    let mut s = connect_tls(&b, client_config(&pki, Some((&cert, &key))))
        .await
        .unwrap();
    let (mechs, outcome) = handshake(&mut s, "EXTERNAL", b"").await;
    assert_eq!(mechs, "EXTERNAL PLAIN AMQPLAIN");
    assert_eq!(outcome, Ok(()));
    // CN=nobody names no user: refused with 403.
    let (cert, key) = pki.issue("nobody", &[]);
    let mut s = connect_tls(&b, client_config(&pki, Some((&cert, &key))))
        .await
        .unwrap();
    let (_, outcome) = handshake(&mut s, "EXTERNAL", b"").await;
    assert_eq!(outcome.unwrap_err().0, 403);
    // A certificate from another CA fails the TLS handshake.
    let other = Pki::new("other");
    let (cert, key) = other.issue("guest", &[]);
    let failed = match connect_tls(&b, client_config(&pki, Some((&cert, &key)))).await {
        Err(_) => true,
        // TLS 1.3 reports a refused client certificate on the first read.
        Ok(mut s) => {
            let _ = s.write_all(b"AMQP\x00\x00\x09\x01").await;
            let mut buf = [0u8; 64];
            !matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await, Ok(Ok(n)) if n > 0)
        }
    };
    assert!(failed, "a certificate from an unknown CA is refused");
    // Plain AMQP still works beside AMQPS.
    let (_c, ch) = channel(&b).await;
    declare(&ch, "after-tls").await;
    b.stop().await;
    cleanup(&pki.dir);
    cleanup(&other.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_settings_are_checked_at_start() {
    let r = warren_broker::start({
        let mut c = warren_broker::Config::for_tests();
        c.amqps_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
        c
    })
    .await;
    assert!(
        r.is_err(),
        "--amqps-listen without a certificate is refused"
    );
    let pki = Pki::new("bad");
    let missing = pki.dir.join("missing.pem");
    let r = warren_broker::start({
        let mut c = warren_broker::Config::for_tests();
        c.amqps_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
        c.tls_cert = Some(missing.clone());
        c.tls_key = Some(missing);
        c
    })
    .await;
    assert!(r.is_err(), "an unreadable certificate is refused");
    cleanup(&pki.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_api_over_https() {
    let pki = Pki::new("https");
    let (cert, key) = pki.issue("localhost", &["localhost", "127.0.0.1"]);
    let cert = pki.write("server.pem", &cert);
    let key = pki.write("server.key", &key);
    let b = broker_with({
        let (cert, key) = (cert.clone(), key.clone());
        move |c| {
            c.amqps_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
            c.https_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
            c.tls_cert = Some(cert);
            c.tls_key = Some(key);
        }
    })
    .await;
    let https = b.https.expect("an HTTPS listener");
    let base = format!("https://localhost:{}/api", https.port());
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve("localhost", https)
        .build()
        .unwrap();

    // guest logs in from loopback over HTTPS as over HTTP.
    let r = client
        .get(format!("{base}/whoami"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let who: serde_json::Value = r.json().await.unwrap();
    assert_eq!(who["name"], "guest");

    // The listeners list and the health check name the TLS listeners by RabbitMQ's protocols.
    let overview: serde_json::Value = client
        .get(format!("{base}/overview"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let protocols: Vec<&str> = overview["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["protocol"].as_str())
        .collect();
    assert!(protocols.contains(&"https"), "{protocols:?}");
    assert!(protocols.contains(&"amqp/ssl"), "{protocols:?}");
    for proto in ["https", "amqps"] {
        let r = client
            .get(format!("{base}/health/checks/protocol-listener/{proto}"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{proto}");
    }

    // Bad credentials over HTTPS get RabbitMQ's 401 body.
    let r = client
        .get(format!("{base}/overview"))
        .basic_auth("guest", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A client that does not trust the CA fails the handshake; plain HTTP to the TLS port gets
    // no HTTP answer; neither stops the listener.
    let untrusting = reqwest::Client::builder()
        .resolve("localhost", https)
        .build()
        .unwrap();
    assert!(untrusting
        .get(format!("{base}/overview"))
        .send()
        .await
        .is_err());
    let plain = reqwest::Client::new()
        .get(format!("http://{https}/api/overview"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await;
    assert!(plain.map(|r| r.status() != 200).unwrap_or(true));
    let mut idle = tokio::net::TcpStream::connect(https).await.unwrap();
    idle.write_all(b"\x16\x03\x01").await.unwrap(); // a handshake that never finishes
    let r = client
        .get(format!("{base}/overview"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a stalled handshake delays no one else");
    drop(idle);

    // warrenctl reaches it with --cacert.
    let ca_path = pki.dir.join("ca.pem");
    let ctl = std::env::var_os("WARRENCTL_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/warrenctl")
        });
    let url = format!("https://localhost:{}", https.port());
    // "localhost" may resolve to ::1 first, where nothing listens; warrenctl then tries 127.0.0.1.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&ctl)
            .arg("--url")
            .arg(url)
            .arg("--cacert")
            .arg(&ca_path)
            .arg("list_vhosts")
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "warrenctl over HTTPS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains('/'));
    b.stop().await;
    cleanup(&pki.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_needs_a_certificate() {
    let r = warren_broker::start({
        let mut c = warren_broker::Config::for_tests();
        c.https_listen = warren_broker::config::parse_listen("127.0.0.1:0").unwrap();
        c
    })
    .await;
    assert!(
        r.is_err(),
        "--https-listen without a certificate is refused"
    );
}
