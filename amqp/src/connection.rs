//! One AMQP connection: the reader task (this function's task) runs the handshake and every
//! channel's methods in arrival order; a writer task drains the connection's `Outbox` into the
//! socket, coalescing what is pending into one vectored write and sending heartbeats. Connection
//! errors close the connection with `connection.close`; channel errors are handled in `channel`.
//! A panic in either task is a bug, but it ends only its connection: `Conn`'s drop closes it
//! with 541 INTERNAL_ERROR and releases what it held (consumers, unacked deliveries requeued,
//! exclusive queues). However the writer ends (a write failed, the store stopped or refused a
//! held reply's write, a panic), its guard closes the outbox and stops the reader.

use hashbrown::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};
use warren_protocol::{
    codec::{check_protocol_header, DecodeError, Decoder, Frame, HeaderCheck},
    encode::WriteBatch,
    protocol::{channel, connection, AMQPClass},
    reply, sasl, AMQPValue, FieldTable, LongString, FRAME_END, PROTOCOL_HEADER,
};

use crate::channel::{Channel, ConnCtx};
use crate::outbox::{Outbox, Outgoing};
use warren_core::auth::UserLimits;
use warren_core::broker::{Broker, LoginError};
use warren_core::connections::{ConnInfo, Hold};
use warren_core::error::{AmqpError, AmqpResult};

/// Time we wait for close-ok after sending connection.close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest a publisher waits for a congested queue's consumers (`wait_for_flow`).
const FLOW_WAIT: Duration = Duration::from_secs(1);
/// Initial read buffer; it grows to frame_max for large body frames.
const READ_BUFFER: usize = 64 * 1024;
/// The writer writes once this much is encoded, without waiting for the end of the backlog.
const WRITE_CHUNK: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    StartOk,
    TuneOk,
    Open,
    Running,
    /// We sent connection.close; waiting for close-ok.
    Closing,
}

/// Capabilities the client announced in its client-properties.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClientCaps {
    pub consumer_cancel_notify: bool,
    pub connection_blocked: bool,
    pub authentication_failure_close: bool,
}

enum Flow {
    Continue,
    Stop,
    /// connection.start-ok parsed: check these credentials (a store lookup on a cache miss).
    Login(sasl::Credentials),
    /// connection.open for an existing vhost: check the user's access to it.
    Open(String),
    /// A channel method needs a store read first (basic.get on a paged queue): await it, then
    /// handle the frame again.
    Load(warren_core::queue::LoadFuture, Box<Frame>),
}

struct Conn {
    id: u64,
    peer: SocketAddr,
    broker: Arc<Broker>,
    outbox: Arc<Outbox>,
    decoder: Decoder,
    frame_max: Arc<AtomicU32>,
    heartbeat: Arc<AtomicU16>,
    channel_max: u16,
    phase: Phase,
    caps: ClientCaps,
    user: String,
    mechanism: String,
    /// The verified client certificate's CN (AMQPS with a client certificate): offered as
    /// SASL EXTERNAL.
    peer_cn: Option<String>,
    /// The login is SASL EXTERNAL: the certificate is the credential.
    external: bool,
    ctx: Option<ConnCtx>,
    channels: HashMap<u16, Channel>,
    close_deadline: Option<Instant>,
    /// Times this publisher was held for the store (the first is logged as a warning).
    holds: u64,
    /// Publishes counted on this connection's channels at the last alarm check.
    publishes_seen: u64,
    /// The user's max-channels limit, read at connection.open.
    user_max_channels: Option<u64>,
    /// `cleanup` ran (the normal end); otherwise `Drop` runs it.
    cleaned: bool,
    /// Cancelled when the writer task ends abnormally (a panic): the reader stops too.
    writer_gone: CancellationToken,
    /// Woken when a message this connection published was acked everywhere it went
    /// (`warren_core::confirm`): its confirm need not wait for the store.
    confirm_waker: Arc<tokio::sync::Notify>,
    /// Outboxes this connection's publishes filled (returns, reply-to replies): the socket is
    /// not read until they drain (`wait_for_room`).
    full_outboxes: Vec<Arc<dyn warren_core::delivery::DeliverySink>>,
    /// A queue this connection published to cannot keep up: the outbox its consumers wait on
    /// (`wait_for_flow`).
    congested: Option<Arc<dyn warren_core::delivery::DeliverySink>>,
    /// What the management API shows of this connection, and its close handle.
    info: Arc<ConnInfo>,
}

impl Drop for Conn {
    /// The guard for a panicking reader: everything the connection held is released here, so a
    /// bug in one connection never strands consumers, deliveries or exclusive queues.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        if std::thread::panicking() {
            error!("connection task panicked; closing it with 541 and releasing what it held");
            self.outbox.push_method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: reply::INTERNAL_ERROR,
                    reply_text: warren_protocol::short::truncated("INTERNAL_ERROR"),
                    class_id: 0,
                    method_id: 0,
                })),
            );
        }
        // A second panic while unwinding would abort the process: contain it.
        let released = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.cleanup()));
        if released.is_err() {
            error!("releasing a panicked connection panicked too");
        }
        self.outbox.push(Outgoing::Shutdown);
    }
}

/// Closes the outbox and stops the reader when the writer task ends, however it ends (the
/// writer's early returns rely on it): a connection cannot go on without its writer, and
/// frames read after it has closed the connection must not be acted on.
struct WriterGuard(CancellationToken, Arc<Outbox>);

impl WriterGuard {
    /// Stops the reader now (before the writer's last frames go out).
    fn stop_reader(&self) {
        self.0.cancel();
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            error!("connection writer panicked; closing the connection");
        }
        self.1.close();
        self.0.cancel();
    }
}

/// Serves one client socket until it closes.
pub async fn run(socket: TcpStream, peer: SocketAddr, broker: Arc<Broker>) {
    let _ = socket.set_nodelay(true);
    let local = socket.local_addr().unwrap_or(peer);
    // The TCP halves need no lock between them (the TLS ones do).
    let (rd, wr) = socket.into_split();
    serve_counted(rd, wr, peer, local, broker, None).await
}

/// Serves one client over TLS (AMQPS) until it closes.
pub async fn run_tls(
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    local: SocketAddr,
    broker: Arc<Broker>,
) {
    let tls = crate::tls::TlsInfo::of(stream.get_ref().1);
    let (rd, wr) = tokio::io::split(stream);
    serve_counted(rd, wr, peer, local, broker, Some(tls)).await
}

async fn serve_counted<R, W>(
    rd: R,
    wr: W,
    peer: SocketAddr,
    local: SocketAddr,
    broker: Arc<Broker>,
    tls: Option<crate::tls::TlsInfo>,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let _counted = broker.count_connection();
    let id = broker.next_connection_id();
    // Listed by the management API until this task ends (also by a panic).
    let registered = broker
        .connections
        .register(id, peer, local, tls.is_some(), &broker.shutdown);
    broker.stats.connection_created.inc();
    let span = tracing::info_span!("conn", id, %peer);
    serve(rd, wr, peer, broker, id, registered.info.clone(), tls)
        .instrument(span)
        .await
}

async fn serve<R, W>(
    mut rd: R,
    mut wr: W,
    peer: SocketAddr,
    broker: Arc<Broker>,
    id: u64,
    info: Arc<ConnInfo>,
    tls: Option<crate::tls::TlsInfo>,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(READ_BUFFER);

    // Protocol header.
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(broker.config.handshake_timeout);
    loop {
        match check_protocol_header(&mut buf) {
            HeaderCheck::Amqp091 => break,
            HeaderCheck::Wrong => {
                debug!("wrong protocol header; answering with 0-9-1's");
                let _ = wr.write_all(&PROTOCOL_HEADER).await;
                let _ = wr.shutdown().await;
                return;
            }
            HeaderCheck::Incomplete => {}
        }
        match tokio::time::timeout_at(deadline, rd.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }

    let outbox = Outbox::new(broker.config.outbox_bytes as usize);
    let frame_max = Arc::new(AtomicU32::new(warren_protocol::FRAME_MIN_SIZE));
    let heartbeat = Arc::new(AtomicU16::new(0));
    let writer_gone = CancellationToken::new();
    let guard = WriterGuard(writer_gone.clone(), outbox.clone());
    let writer = tokio::spawn(
        write_loop(
            guard,
            wr,
            outbox.clone(),
            frame_max.clone(),
            heartbeat.clone(),
            broker.persist.writer.clone(),
            info.clone(),
        )
        .in_current_span(),
    );

    let mut conn = Conn {
        id,
        peer,
        decoder: Decoder::before_tune(),
        outbox: outbox.clone(),
        frame_max,
        heartbeat,
        channel_max: broker.config.channel_max,
        phase: Phase::StartOk,
        caps: ClientCaps::default(),
        user: String::new(),
        mechanism: String::new(),
        ctx: None,
        channels: HashMap::new(),
        close_deadline: None,
        holds: 0,
        publishes_seen: 0,
        user_max_channels: None,
        cleaned: false,
        writer_gone,
        confirm_waker: Arc::new(tokio::sync::Notify::new()),
        full_outboxes: Vec::new(),
        congested: None,
        peer_cn: tls.and_then(|t| t.peer_cn),
        external: false,
        info,
        broker,
    };
    conn.send_start();
    conn.read_loop(&mut rd, buf, deadline).await;
    conn.cleanup();
    conn.cleaned = true;
    outbox.push(Outgoing::Shutdown);
    if tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .is_err()
    {
        // The writer is still busy (a reply held for the store, a peer that does not read):
        // a closed outbox makes it stop.
        outbox.close();
    }
}

impl Conn {
    async fn read_loop(
        &mut self,
        rd: &mut (impl AsyncRead + Unpin),
        mut buf: BytesMut,
        handshake_deadline: tokio::time::Instant,
    ) {
        let mut last_read = Instant::now();
        let store = self.broker.persist.writer.clone();
        let mut committed = store.subscribe();
        let writer_gone = self.writer_gone.clone();
        let info = self.info.clone();
        let confirm_waker = self.confirm_waker.clone();
        let mut in_place: Option<InPlace> = None;
        // The channel of the last content frame: while its body expects more large frames,
        // reads stop at the next frame header (`read_limit`).
        let mut content_channel = None;
        loop {
            loop {
                if writer_gone.is_cancelled() {
                    // The writer has closed the connection: nothing read is acted on.
                    return;
                }
                match next_frame(&self.decoder, &mut buf, &mut in_place) {
                    Ok(Some(frame)) => {
                        // Small body frames (a low frame_max, a client that splits) are
                        // read as they come.
                        content_channel = match &frame {
                            Frame::Header { channel, .. } | Frame::BodyInPlace { channel, .. } => {
                                Some(*channel)
                            }
                            Frame::Body { channel, payload } if payload.len() >= IN_PLACE_MIN => {
                                Some(*channel)
                            }
                            _ => None,
                        };
                        match self.handle_and_await(frame).await {
                            Ok(Flow::Stop) => return,
                            Ok(_) => {}
                            Err(e) => {
                                if self.connection_error(e) {
                                    return;
                                }
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.connection_error(e.into());
                        // The stream is out of sync: nothing more can be parsed.
                        self.flush_confirms();
                        self.drain_until_closed(rd).await;
                        return;
                    }
                }
            }
            if in_place.is_none() {
                in_place = self.start_in_place(&mut buf);
            }
            self.flush_confirms();
            if store.over_limit() && self.channels.values().any(|c| c.stored_publishes) {
                self.hold_publisher(&store).await;
                last_read = Instant::now();
            }
            // A resource alarm blocks a connection once it publishes (as RabbitMQ's
            // "blocking" then "blocked"): one that only consumes and acks goes on.
            let published = self.publishes();
            if published > self.publishes_seen && self.broker.alarms.state().any() {
                self.hold_for_alarm(&store).await;
                last_read = Instant::now();
            }
            self.publishes_seen = published;
            if self.wait_for_room().await | self.wait_for_flow().await {
                // Not reading was our choice: the peer's silence meanwhile is not missed
                // heartbeats.
                last_read = Instant::now();
            }
            if let Some(need) = self.decoder.needed(&buf) {
                if need > buf.len() {
                    buf.reserve(need - buf.len());
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(READ_BUFFER);
            }
            let timeout = self.read_timeout(last_read, handshake_deadline);
            let limit = self.read_limit(&buf, in_place.as_ref(), content_channel);
            tokio::select! {
                r = read_some(rd, &mut buf, in_place.as_mut(), limit) => match r {
                    Ok(0) => {
                        if self.phase != Phase::Closing {
                            info!("client closed the socket without connection.close");
                        }
                        return;
                    }
                    Ok(n) => {
                        last_read = Instant::now();
                        info.stats.recv_oct.add(n as u64);
                        info.stats.recv_cnt.inc();
                    }
                    Err(e) => {
                        info!(error = %e, "read failed");
                        return;
                    }
                },
                _ = tokio::time::sleep_until(timeout) => {
                    match self.phase {
                        Phase::Closing => debug!("no close-ok in time; closing the socket"),
                        Phase::Running => {
                            let hb = self.heartbeat.load(Ordering::Relaxed);
                            warn!("missed heartbeats from client, timeout: {}s", hb);
                        }
                        _ => warn!("handshake timed out"),
                    }
                    return;
                }
                _ = writer_gone.cancelled() => return,
                _ = committed.changed(), if self.confirms_waiting() => {
                    self.flush_confirms();
                }
                // A message this connection published was acked everywhere it went.
                _ = confirm_waker.notified(), if self.confirms_waiting() => {
                    self.flush_confirms();
                }
                // One token for both: the broker's shutdown (its parent) and an operator's
                // close, which leaves its reason.
                _ = info.close_requested(), if self.phase != Phase::Closing => {
                    let reason = match info.close_reason() {
                        Some(reason) => {
                            info!(%reason, "connection closed by an operator");
                            reason
                        }
                        None => "broker forced connection closure with reason 'shutdown'".into(),
                    };
                    self.connection_error(AmqpError::new(reply::CONNECTION_FORCED, reason));
                }
            }
        }
    }

    /// Lends the body frame whose header starts `buf` its message's buffer, when it is large
    /// enough to be worth reading straight into it; the payload bytes already read go with it.
    fn start_in_place(&mut self, buf: &mut BytesMut) -> Option<InPlace> {
        let (channel, len) = self.decoder.body_frame_header(buf)?;
        let have = buf.len() - 7;
        if len < IN_PLACE_MIN || have >= len {
            return None;
        }
        let mut body = self.channels.get_mut(&channel)?.take_body_buffer(len)?;
        body.extend_from_slice(&buf[7..]);
        buf.clear();
        Some(InPlace {
            channel,
            len,
            left: len - have,
            body,
        })
    }

    /// How much the next read may put in the read buffer: while a body expects more large
    /// frames, only up to the next frame header (and the frame end before it), so that
    /// frame's payload can be read straight into the body. None is as much as has arrived.
    fn read_limit(
        &self,
        buf: &BytesMut,
        in_place: Option<&InPlace>,
        content_channel: Option<u16>,
    ) -> Option<usize> {
        let (channel, frame_end, this_frame) = match in_place {
            Some(p) if p.left > 0 => return None,
            Some(p) => (p.channel, 1, p.len as u64),
            None => (content_channel?, 0, 0),
        };
        let left = self.channels.get(&channel)?.body_left();
        let want = 7 + frame_end;
        (left.saturating_sub(this_frame) >= IN_PLACE_MIN as u64 && buf.len() < want)
            .then(|| want - buf.len())
    }

    /// After a framing error: send what is queued, then wait briefly for the peer to go.
    async fn drain_until_closed(&mut self, rd: &mut (impl AsyncRead + Unpin)) {
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }

    fn read_timeout(
        &self,
        last_read: Instant,
        handshake_deadline: tokio::time::Instant,
    ) -> tokio::time::Instant {
        if let Some(d) = self.close_deadline {
            return tokio::time::Instant::from_std(d);
        }
        match self.phase {
            Phase::Running => {
                let hb = self.heartbeat.load(Ordering::Relaxed) as u64;
                if hb == 0 {
                    tokio::time::Instant::now() + Duration::from_secs(86_400)
                } else {
                    tokio::time::Instant::from_std(last_read + Duration::from_secs(hb * 2))
                }
            }
            _ => handshake_deadline,
        }
    }

    fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::StartOk => "starting",
            Phase::TuneOk => "tuning",
            Phase::Open => "opening",
            Phase::Running => "running",
            Phase::Closing => "closing",
        }
    }

    fn send(&self, channel: u16, method: AMQPClass) {
        self.outbox
            .push(Outgoing::Method(channel, Box::new(method)));
    }

    fn send_start(&self) {
        let cfg = &self.broker.config;
        let mut caps = FieldTable::default();
        for c in [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "consumer_priorities",
            "authentication_failure_close",
            "per_consumer_qos",
            "direct_reply_to",
        ] {
            caps.insert(c.into(), AMQPValue::Boolean(true));
        }
        let mut props = FieldTable::default();
        let s = |v: &str| AMQPValue::LongString(LongString::from(v));
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        props.insert("product".into(), s(&cfg.product));
        props.insert("version".into(), s(&cfg.product_version));
        props.insert(
            "platform".into(),
            s(&format!("Warren {} (Rust)", env!("CARGO_PKG_VERSION"))),
        );
        props.insert("cluster_name".into(), s("warren"));
        props.insert("copyright".into(), s("Copyright (c) the Warren authors"));
        props.insert(
            "information".into(),
            s("Warren, an AMQP 0-9-1 broker compatible with RabbitMQ. Licensed under the Apache License 2.0"),
        );
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: props,
                mechanisms: LongString::from(if self.peer_cn.is_some() {
                    "EXTERNAL PLAIN AMQPLAIN"
                } else {
                    "PLAIN AMQPLAIN"
                }),
                locales: LongString::from("en_US"),
            })),
        );
    }

    /// Sends connection.close for `e`. Returns true when the connection should end now (no
    /// close-ok to wait for).
    fn connection_error(&mut self, e: AmqpError) -> bool {
        if self.phase == Phase::Closing {
            return false;
        }
        if e.code == reply::CONNECTION_FORCED {
            info!("closing connection: {}", e);
        } else {
            warn!(user = %self.user, "connection error: {}", e);
        }
        let close = AmqpError { code: e.code, ..e };
        let method = if close.is_connection_error() || close.code == reply::ACCESS_REFUSED {
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: close.code,
                reply_text: close.reply_text(),
                class_id: close.class_id,
                method_id: close.method_id,
            }))
        } else {
            close.close_method()
        };
        self.send(0, method);
        self.shutdown_channels();
        self.phase = Phase::Closing;
        self.close_deadline = Some(Instant::now() + CLOSE_TIMEOUT);
        false
    }

    fn handle(&mut self, frame: Frame) -> AmqpResult<Flow> {
        if self.phase == Phase::Closing {
            // Only the close handshake matters now.
            if let Frame::Method {
                channel: 0,
                class: AMQPClass::Connection(m),
                ..
            } = frame
            {
                match m {
                    connection::AMQPMethod::CloseOk(_) => return Ok(Flow::Stop),
                    connection::AMQPMethod::Close(_) => {
                        self.send(
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                connection::CloseOk {},
                            )),
                        );
                        return Ok(Flow::Stop);
                    }
                    _ => {}
                }
            }
            return Ok(Flow::Continue);
        }
        match frame {
            Frame::Heartbeat { channel: 0 } => Ok(Flow::Continue),
            Frame::Heartbeat { .. } => {
                Err(AmqpError::unexpected_frame("type 8, all octets = <<>>"))
            }
            Frame::Method {
                channel: 0,
                class,
                head,
            } => self.handle_connection_method(class, head.ids()),
            Frame::Method { channel: _, .. }
            | Frame::Header { .. }
            | Frame::Body { .. }
            | Frame::BodyInPlace { .. }
                if self.phase != Phase::Running =>
            {
                Err(AmqpError::unexpected_frame(
                    "frame on a channel before connection.open-ok",
                ))
            }
            Frame::Header { channel: 0, .. } => {
                Err(AmqpError::unexpected_frame("type 2 on channel 0"))
            }
            Frame::Body { channel: 0, .. } | Frame::BodyInPlace { channel: 0, .. } => {
                Err(AmqpError::unexpected_frame("type 3 on channel 0"))
            }
            frame => self.handle_channel_frame(frame),
        }
    }

    /// Runs a frame's handler, then the store lookup a login or vhost open asked for.
    async fn handle_and_await(&mut self, frame: Frame) -> AmqpResult<Flow> {
        let mut flow = self.handle(frame)?;
        loop {
            return match flow {
                Flow::Login(creds) => self.login(creds).await,
                Flow::Open(vhost) => self.open_vhost(vhost).await.map(|()| Flow::Continue),
                Flow::Load(read, frame) => {
                    read.await;
                    flow = self.handle(*frame)?;
                    continue;
                }
                flow => Ok(flow),
            };
        }
    }

    fn handle_connection_method(&mut self, class: AMQPClass, ids: (u16, u16)) -> AmqpResult<Flow> {
        use connection::AMQPMethod as M;
        let AMQPClass::Connection(m) = class else {
            return Err(AmqpError::channel_error(format!(
                "unexpected method in connection state {}",
                self.phase_name()
            ))
            .at(ids.0, ids.1));
        };
        match (self.phase, m) {
            (Phase::StartOk, M::StartOk(s)) => self.on_start_ok(s),
            (Phase::TuneOk, M::TuneOk(t)) => self.on_tune_ok(t),
            (Phase::Open, M::Open(o)) => self.on_open(o),
            (_, M::Close(c)) => {
                debug!(code = c.reply_code, text = %c.reply_text, "client closed the connection");
                self.shutdown_channels();
                self.send(0, AMQPClass::Connection(M::CloseOk(connection::CloseOk {})));
                Ok(Flow::Stop)
            }
            (Phase::Running, M::UpdateSecret(_)) => {
                self.send(
                    0,
                    AMQPClass::Connection(M::UpdateSecretOk(connection::UpdateSecretOk {})),
                );
                Ok(Flow::Continue)
            }
            (Phase::Running, M::Blocked(_) | M::Unblocked(_)) => Ok(Flow::Continue),
            (_, _) => Err(AmqpError::channel_error(format!(
                "unexpected method in connection state {}",
                self.phase_name()
            ))
            .at(ids.0, ids.1)),
        }
    }

    fn on_start_ok(&mut self, s: connection::StartOk) -> AmqpResult<Flow> {
        if let Some(AMQPValue::FieldTable(caps)) = s.client_properties.inner().get("capabilities") {
            let on = |k: &str| matches!(caps.inner().get(k), Some(AMQPValue::Boolean(true)));
            self.caps = ClientCaps {
                consumer_cancel_notify: on("consumer_cancel_notify"),
                connection_blocked: on("connection.blocked"),
                authentication_failure_close: on("authentication_failure_close"),
            };
        }
        self.mechanism = s.mechanism.as_str().to_string();
        self.info.update_session(|session| {
            session.auth_mechanism = s.mechanism.as_str().to_string();
            session.client_properties = s.client_properties.clone();
        });
        if self.mechanism == "EXTERNAL" {
            let Some(cn) = self.peer_cn.clone() else {
                warn!("login refused: EXTERNAL without a verified client certificate");
                return Ok(Flow::Stop);
            };
            self.external = true;
            return Ok(Flow::Login(sasl::Credentials {
                username: cn,
                password: String::new(),
            }));
        }
        match sasl::parse_response(&self.mechanism, s.response.as_bytes()) {
            Ok(creds) => Ok(Flow::Login(creds)),
            // RabbitMQ logs these and drops the socket without a close frame.
            Err(e) => {
                warn!("login refused: {e}");
                Ok(Flow::Stop)
            }
        }
    }

    /// The second half of connection.start-ok: the credentials against the stored user.
    async fn login(&mut self, creds: sasl::Credentials) -> AmqpResult<Flow> {
        let checked = if self.external {
            self.broker
                .authenticate_external(&creds.username, self.peer.ip())
                .await
        } else {
            self.broker
                .authenticate(&creds.username, &creds.password, self.peer.ip())
                .await
        };
        self.broker.auth_attempts.amqp.record(checked.is_ok());
        if let Err(e) = checked {
            let why = match e {
                LoginError::UnknownUser => format!("user '{}' does not exist", creds.username),
                LoginError::BadPassword => {
                    format!("invalid credentials for user '{}'", creds.username)
                }
                LoginError::LoopbackOnly => {
                    format!("user '{}' can only connect via localhost", creds.username)
                }
                LoginError::NoVhostAccess => format!("user '{}' has no access", creds.username),
                LoginError::StoreUnavailable(e) => {
                    error!("cannot look up user '{}': {e}", creds.username);
                    format!("user '{}' could not be looked up", creds.username)
                }
            };
            warn!(mechanism = %self.mechanism, "login refused: {why}");
            if self.caps.authentication_failure_close {
                return Err(AmqpError::access_refused(format!(
                    "Login was refused using authentication mechanism {}. For details see the broker logfile.",
                    self.mechanism
                )));
            }
            return Ok(Flow::Stop);
        }
        self.user = creds.username;
        self.info
            .update_session(|session| session.user = self.user.clone());
        let cfg = &self.broker.config;
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: cfg.channel_max,
                frame_max: cfg.frame_max,
                heartbeat: cfg.heartbeat,
            })),
        );
        self.phase = Phase::TuneOk;
        Ok(Flow::Continue)
    }

    fn on_tune_ok(&mut self, t: connection::TuneOk) -> AmqpResult<Flow> {
        let cfg = &self.broker.config;
        let check = |name: &str, client: u64, server: u64| -> AmqpResult<()> {
            if server != 0 && (client == 0 || client > server) {
                let none = if client == 0 { " (no limit)" } else { "" };
                return Err(AmqpError::not_allowed(format!(
                    "negotiated {name} = {client}{none} is higher than the maximum allowed value ({server})"
                ))
                .at(10, 30));
            }
            Ok(())
        };
        check("channel_max", t.channel_max as u64, cfg.channel_max as u64)?;
        check("frame_max", t.frame_max as u64, cfg.frame_max as u64)?;
        if t.frame_max != 0 && t.frame_max < warren_protocol::FRAME_MIN_SIZE {
            return Err(AmqpError::not_allowed(format!(
                "negotiated frame_max = {} is lower than the minimum allowed value ({})",
                t.frame_max,
                warren_protocol::FRAME_MIN_SIZE
            ))
            .at(10, 30));
        }
        self.channel_max = if t.channel_max == 0 {
            u16::MAX
        } else {
            t.channel_max
        };
        self.frame_max.store(t.frame_max, Ordering::Relaxed);
        self.decoder.set_frame_max(t.frame_max);
        self.heartbeat.store(t.heartbeat, Ordering::Relaxed);
        self.info.frame_max.store(t.frame_max, Ordering::Relaxed);
        self.info
            .channel_max
            .store(t.channel_max, Ordering::Relaxed);
        self.info.heartbeat.store(t.heartbeat, Ordering::Relaxed);
        self.phase = Phase::Open;
        Ok(Flow::Continue)
    }

    fn on_open(&mut self, o: connection::Open) -> AmqpResult<Flow> {
        let name = o.virtual_host.as_str();
        let limit = self.broker.config.max_connections;
        if self.broker.open_connections() > limit {
            warn!(limit, "node connection limit reached; connection refused");
            return Err(AmqpError::not_allowed(format!(
                "connection refused: node connection limit ({limit}) is reached"
            ))
            .at(10, 40));
        }
        let Some(vhost) = self.broker.vhost(name) else {
            return Err(AmqpError::not_allowed(format!("vhost {name} not found")).at(10, 40));
        };
        let max = vhost.max_connections.load(Ordering::Relaxed);
        if max >= 0 && self.broker.connections.in_vhost(name).len() as i64 >= max {
            warn!(
                vhost = name,
                max, "vhost connection limit reached; connection refused"
            );
            return Err(AmqpError::not_allowed(format!(
                "access to vhost '{name}' refused for user '{}': connection limit ({max}) is \
                 reached",
                self.user
            ))
            .at(10, 40));
        }
        Ok(Flow::Open(name.to_string()))
    }

    /// The second half of connection.open: the user needs permissions in the vhost.
    async fn open_vhost(&mut self, name: String) -> AmqpResult<()> {
        let refused = || {
            AmqpError::not_allowed(format!(
                "access to vhost '{name}' refused for user '{}'",
                self.user
            ))
            .at(10, 40)
        };
        let access = match self.broker.vhost_access(&self.user, &name).await {
            Ok(a) => a,
            Err(LoginError::StoreUnavailable(e)) => {
                error!(user = %self.user, vhost = %name, "cannot look up permissions: {e}");
                return Err(refused());
            }
            Err(_) => {
                warn!(user = %self.user, vhost = %name, "vhost access refused: no permissions");
                return Err(refused());
            }
        };
        let Some(vhost) = self.broker.vhost(&name) else {
            return Err(AmqpError::not_allowed(format!("vhost {name} not found")).at(10, 40));
        };
        // RabbitMQ's user limits, read with the user's record (the data cache).
        let limits = match self.broker.users.user(&self.user).await {
            Ok(Some(u)) => UserLimits::parse(&u.limits),
            _ => UserLimits::default(),
        };
        if let Some(max) = limits.max_connections {
            if self.broker.connections.of_user(&self.user).len() as u64 >= max {
                warn!(user = %self.user, max, "user connection limit reached; connection refused");
                return Err(AmqpError::not_allowed(format!(
                    "connection refused for user '{}': user connection limit ({max}) is reached",
                    self.user
                ))
                .at(10, 40));
            }
        }
        self.user_max_channels = limits.max_channels;
        let name = name.as_str();
        info!(user = %self.user, vhost = name, "connection open");
        self.info.update_session(|session| {
            session.vhost = name.to_string();
            session.open = true;
        });
        self.ctx = Some(ConnCtx {
            conn_id: self.id,
            info: self.info.clone(),
            stats: self.broker.stats.clone(),
            access,
            vhost,
            outbox: self.outbox.clone(),
            max_message_size: self.broker.config.max_message_size,
            cancel_notify: self.caps.consumer_cancel_notify,
            limits: crate::channel::Limits {
                consumers: self.broker.config.consumer_max_per_channel,
                tx_messages: self.broker.config.tx_max_messages,
                tx_bytes: self.broker.config.tx_max_bytes,
            },
            confirm_waker: self.confirm_waker.clone(),
        });
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        );
        self.phase = Phase::Running;
        Ok(())
    }

    fn handle_channel_frame(&mut self, frame: Frame) -> AmqpResult<Flow> {
        let id = frame.channel();
        let Some(ctx) = self.ctx.as_ref() else {
            return Err(AmqpError::command_invalid("connection not yet open"));
        };
        if let Frame::Method {
            class: AMQPClass::Channel(channel::AMQPMethod::Open(_)),
            ..
        } = &frame
        {
            if self.channels.contains_key(&id) {
                return Err(AmqpError::channel_error("second 'channel.open' seen").at(20, 10));
            }
            // As RabbitMQ, the limit is on how many channels are open, not on their numbers.
            if self.channels.len() >= self.channel_max as usize {
                return Err(AmqpError::not_allowed(format!(
                    "number of channels opened ({}) has reached the negotiated channel_max ({})",
                    self.channels.len(),
                    self.channel_max
                )));
            }
            if let Some(max) = self.user_max_channels {
                let open: usize = self
                    .broker
                    .connections
                    .of_user(&self.user)
                    .iter()
                    .map(|c| c.channel_count())
                    .sum();
                if open as u64 >= max {
                    warn!(user = %self.user, max, "user channel limit reached");
                    return Err(AmqpError::not_allowed(format!(
                        "number of channels opened for user '{}' has reached the maximum \
                         allowed user limit of ({max})",
                        self.user
                    )));
                }
            }
            let ch = Channel::new(id, ctx);
            self.info.add_channel(ch.handle.clone());
            self.broker.stats.channel_created.inc();
            self.channels.insert(id, ch);
            self.send(
                id,
                AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
            );
            return Ok(Flow::Continue);
        }
        if let (
            Some(name),
            Frame::Method {
                class: AMQPClass::Queue(warren_protocol::protocol::queue::AMQPMethod::Declare(d)),
                ..
            },
        ) = (&self.broker.config.fault_panic_on_queue, &frame)
        {
            if d.queue.as_str() == name {
                panic!("fault injection: declare of queue '{name}'");
            }
        }
        let Some(ch) = self.channels.get_mut(&id) else {
            if let Frame::Method {
                class: AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)),
                ..
            } = &frame
            {
                return Ok(Flow::Continue);
            }
            return Err(AmqpError::channel_error("expected 'channel.open'")
                .at(frame_ids(&frame).0, frame_ids(&frame).1));
        };
        let retry = matches!(
            &frame,
            Frame::Method {
                class: AMQPClass::Basic(warren_protocol::protocol::basic::AMQPMethod::Get(_)),
                ..
            }
        )
        .then(|| frame.clone());
        let after = ch.handle(ctx, frame);
        if let Some(full) = ch.take_full_outbox() {
            self.full_outboxes.push(full);
        }
        if let Some(outbox) = ch.take_congested() {
            self.congested = Some(outbox);
        }
        match after {
            Ok(crate::channel::After::Keep) => match (ch.take_pending_load(), retry) {
                (Some(read), Some(frame)) => Ok(Flow::Load(read, Box::new(frame))),
                _ => Ok(Flow::Continue),
            },
            Ok(crate::channel::After::Remove) => {
                self.channels.remove(&id);
                self.info.remove_channel(id);
                self.broker.stats.channel_closed.inc();
                Ok(Flow::Continue)
            }
            Err(e) if e.is_connection_error() => Err(e),
            Err(e) => {
                ch.fail(ctx, e);
                Ok(Flow::Continue)
            }
        }
    }

    fn flush_confirms(&mut self) {
        for ch in self.channels.values_mut() {
            ch.flush_confirms();
        }
    }

    fn confirms_waiting(&self) -> bool {
        self.channels.values().any(|c| c.confirms_waiting())
    }

    /// basic.publish frames this connection's channels have taken.
    fn publishes(&self) -> u64 {
        self.channels
            .values()
            .map(|c| c.handle.stats.publish.get())
            .sum()
    }

    /// This connection's socket is no longer read (`hold`, as the API shows it); a client that
    /// announced the capability is told with connection.blocked and `reason`.
    fn enter_hold(&mut self, hold: Hold, reason: &str) {
        self.info.set_hold(hold);
        if self.caps.connection_blocked {
            self.send(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
                    reason: reason.into(),
                })),
            );
        }
    }

    /// The socket is read again: connection.unblocked for a client that was told it was blocked.
    fn leave_hold(&mut self) {
        self.info.set_hold(Hold::None);
        if self.caps.connection_blocked {
            self.send(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {})),
            );
        }
    }

    /// A memory or disk alarm is in effect and this connection published: stop reading its
    /// socket until every alarm clears, telling a client that understands it with
    /// connection.blocked (RabbitMQ's reason text) and connection.unblocked. Confirms keep
    /// flowing; an operator's close or the broker's shutdown ends the wait.
    async fn hold_for_alarm(&mut self, store: &Arc<warren_storage::Writer>) {
        let mut alarms = self.broker.alarms.subscribe();
        let state = *alarms.borrow_and_update();
        if !state.any() {
            return;
        }
        self.enter_hold(Hold::Blocked, state.reason());
        info!(
            reason = state.reason(),
            "publisher blocked by a resource alarm"
        );
        let mut committed = store.subscribe();
        let info = self.info.clone();
        let writer_gone = self.writer_gone.clone();
        loop {
            tokio::select! {
                r = alarms.changed() => {
                    if r.is_err() || !alarms.borrow_and_update().any() {
                        break;
                    }
                }
                _ = committed.changed() => self.flush_confirms(),
                _ = info.close_requested() => break,
                _ = writer_gone.cancelled() => break,
            }
        }
        self.leave_hold();
        info!("publisher unblocked");
    }

    /// The store is behind: stop reading this publisher's socket (TCP pushes back) until it
    /// catches up, telling a client that understands it with connection.blocked / unblocked.
    /// Confirms keep flowing meanwhile.
    async fn hold_publisher(&mut self, store: &Arc<warren_storage::Writer>) {
        self.enter_hold(Hold::Flow, "low on store capacity");
        if self.holds == 0 {
            warn!(
                held = store.held_bytes(),
                "publisher held: the store is behind (further holds of this connection are logged at debug)"
            );
        } else {
            debug!(
                held = store.held_bytes(),
                holds = self.holds,
                "publisher held"
            );
        }
        self.holds += 1;
        let mut committed = store.subscribe();
        loop {
            tokio::select! {
                _ = store.room() => break,
                _ = committed.changed() => self.flush_confirms(),
                _ = self.broker.shutdown.cancelled() => break,
            }
        }
        self.leave_hold();
        info!("publisher released");
    }

    /// Backpressure for frames this connection's publishes produce in bulk: while an outbox its
    /// channels filled (its own with basic.return, a direct reply-to requester's with replies)
    /// is full, the socket is not read. Deliveries to its consumers never count here (queues
    /// check for room before delivering). True if it waited.
    async fn wait_for_room(&mut self) -> bool {
        if self.full_outboxes.is_empty() {
            return false;
        }
        let full = std::mem::take(&mut self.full_outboxes);
        debug!(
            outboxes = full.len(),
            "outbox full: not reading until it drains"
        );
        for o in full {
            tokio::select! {
                _ = o.wait_room() => {}
                _ = self.broker.shutdown.cancelled() => break,
                _ = self.writer_gone.cancelled() => break,
            }
        }
        true
    }

    /// Credit flow, as RabbitMQ's: a queue this connection published to cannot keep up (its
    /// consumers have credit, their connection's outbox is full, and a long ready part waits
    /// in memory). The socket is not read until that outbox has room, for at most `FLOW_WAIT`,
    /// so a consumer that stops reading slows its publishers without stopping them. Confirms
    /// keep flowing; the management API shows the connection in state "flow" meanwhile, and
    /// no connection.blocked is sent (RabbitMQ sends none for credit flow). True if it waited.
    async fn wait_for_flow(&mut self) -> bool {
        let Some(outbox) = self.congested.take() else {
            return false;
        };
        self.info.set_hold(Hold::Flow);
        let mut committed = self.broker.persist.writer.subscribe();
        let confirm_waker = self.confirm_waker.clone();
        let info = self.info.clone();
        let shutdown = self.broker.shutdown.clone();
        let writer_gone = self.writer_gone.clone();
        let room = outbox.wait_room();
        tokio::pin!(room);
        let deadline = tokio::time::sleep(FLOW_WAIT);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut room => break,
                _ = &mut deadline => break,
                _ = shutdown.cancelled() => break,
                _ = writer_gone.cancelled() => break,
                _ = info.close_requested() => break,
                r = committed.changed(), if self.confirms_waiting() => {
                    if r.is_err() {
                        break;
                    }
                    self.flush_confirms();
                }
                _ = confirm_waker.notified(), if self.confirms_waiting() => self.flush_confirms(),
            }
        }
        self.info.set_hold(Hold::None);
        true
    }

    /// Closes every channel: consumers cancelled, unacked deliveries requeued.
    fn shutdown_channels(&mut self) {
        if let Some(ctx) = &self.ctx {
            for (id, mut ch) in self.channels.drain() {
                ch.shutdown(ctx);
                self.info.remove_channel(id);
                self.broker.stats.channel_closed.inc();
            }
        }
    }

    fn cleanup(&mut self) {
        self.shutdown_channels();
        if let Some(ctx) = &self.ctx {
            ctx.vhost.drop_exclusive(self.id);
        }
        self.broker.stats.connection_closed.inc();
        debug!("connection closed");
    }
}

/// Body frames at least this long are read straight into their message's buffer.
const IN_PLACE_MIN: usize = 16 * 1024;

/// A body frame being read straight into its message (`Assembler::take_body_buffer`).
struct InPlace {
    /// The frame's channel, whose assembler lent `body`.
    channel: u16,
    /// The frame's payload size.
    len: usize,
    /// Payload bytes still to read; then the frame end, from the read buffer.
    left: usize,
    /// The message's body so far; the payload is read onto its end.
    body: BytesMut,
}

/// The next whole frame: the body frame read in place once its payload is in and its frame
/// end checked, else the next frame in the read buffer.
fn next_frame(
    decoder: &Decoder,
    buf: &mut BytesMut,
    in_place: &mut Option<InPlace>,
) -> Result<Option<Frame>, DecodeError> {
    match in_place.take() {
        None => decoder.decode(buf),
        Some(p) if p.left > 0 || buf.is_empty() => {
            *in_place = Some(p);
            Ok(None)
        }
        Some(p) if buf[0] == FRAME_END => {
            buf.advance(1);
            Ok(Some(Frame::BodyInPlace {
                channel: p.channel,
                body: p.body,
                len: p.len,
            }))
        }
        Some(_) => Err(DecodeError::BadFrameEnd(buf[0])),
    }
}

/// One read: into the lent body while a body frame's payload is owed, else into the read
/// buffer (at most `limit` bytes). Cancel-safe, as `read_buf` is.
async fn read_some(
    rd: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    in_place: Option<&mut InPlace>,
    limit: Option<usize>,
) -> std::io::Result<usize> {
    match in_place {
        Some(p) if p.left > 0 => {
            let n = (&mut *rd).take(p.left as u64).read_buf(&mut p.body).await?;
            p.left -= n.min(p.left);
            Ok(n)
        }
        _ => match limit {
            Some(limit) => (&mut *rd).take(limit as u64).read_buf(buf).await,
            None => rd.read_buf(buf).await,
        },
    }
}

fn frame_ids(frame: &Frame) -> (u16, u16) {
    match frame {
        Frame::Method { head, .. } => head.ids(),
        _ => (0, 0),
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    guard: WriterGuard,
    mut wr: W,
    outbox: Arc<Outbox>,
    frame_max: Arc<AtomicU32>,
    heartbeat: Arc<AtomicU16>,
    store: Arc<warren_storage::Writer>,
    info: Arc<ConnInfo>,
) {
    let mut items = Vec::new();
    let mut batch = WriteBatch::new();
    let mut deliver = crate::outbox::DeliverTemplate::new();
    let mut last_write = Instant::now();
    // One timer for heartbeats, re-armed when it fires or the interval changes (not one per
    // wake-up: a busy writer wakes hundreds of thousands of times a second).
    let mut tick = Duration::from_secs(3600);
    let timer = tokio::time::sleep(tick);
    tokio::pin!(timer);
    loop {
        let hb = heartbeat.load(Ordering::Relaxed);
        let want = if hb == 0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(hb as u64) / 2
        };
        if want != tick {
            tick = want;
            timer.as_mut().reset(tokio::time::Instant::now() + tick);
        }
        tokio::select! {
            _ = outbox.wait() => {}
            _ = &mut timer => {
                let next = if hb > 0 && last_write.elapsed() >= tick {
                    batch.push_heartbeat();
                    tokio::time::Instant::now() + tick
                } else {
                    // Written meanwhile: idle for `tick` counts from that write.
                    tokio::time::Instant::from_std(last_write + tick)
                };
                timer.as_mut().reset(next);
            }
        }
        outbox.take(&mut items);
        let fm = match frame_max.load(Ordering::Relaxed) {
            0 => usize::MAX,
            n => n as usize,
        };
        let mut stop = false;
        for item in items.drain(..) {
            let r = match item {
                Outgoing::Method(ch, m) => batch.push_method(ch, &m),
                Outgoing::Content(ch, m, msg) => batch
                    .push_method(ch, &m)
                    .map(|_| batch.push_content(ch, &msg.header, &msg.body, fm)),
                Outgoing::Deliver(d) => {
                    deliver.fill(&d);
                    batch
                        .push_method(d.channel, &deliver.method)
                        .map(|_| batch.push_content(d.channel, &d.msg.header, &d.msg.body, fm))
                }
                Outgoing::Heartbeat => {
                    batch.push_heartbeat();
                    Ok(())
                }
                Outgoing::Gate(tickets) => {
                    let ticket = tickets.last();
                    if store.committed() < ticket {
                        if let Err(e) = write_batch(&mut wr, &mut batch, &info).await {
                            debug!(error = %e, "write failed");
                            return;
                        }
                        let gated = gate(&mut wr, &store, ticket, &heartbeat, &outbox, &info);
                        match gated.await {
                            Ok(GateEnd::Committed) => {}
                            Ok(GateEnd::StoreStopped) => {
                                // The store writer stopped: what follows must not be sent as
                                // if it had been stored.
                                debug!("store writer stopped; closing the connection");
                                return;
                            }
                            Ok(GateEnd::Closed) => return,
                            Err(e) => {
                                debug!(error = %e, "write failed");
                                return;
                            }
                        }
                        last_write = Instant::now();
                    }
                    if tickets.own().any(|t| store.failed(t)) {
                        // What follows (a declare-ok, a commit-ok) would claim a write the
                        // store refused: the client hears why, and nothing after it.
                        let e = AmqpError::internal(STORE_REFUSED);
                        warn!("{}; closing the connection", e);
                        guard.stop_reader();
                        let _ = batch.push_method(0, &e.close_method());
                        let _ = write_batch(&mut wr, &mut batch, &info).await;
                        let _ = wr.shutdown().await;
                        return;
                    }
                    Ok(())
                }
                Outgoing::Shutdown => {
                    stop = true;
                    break;
                }
            };
            if let Err(e) = r {
                warn!(error = %e, "could not encode an outgoing frame");
            }
            // A full outbox of small deliveries encodes to more than the outbox counted:
            // write as we go so that the batch's buffer stays small on every connection.
            if batch.encoded_len() >= WRITE_CHUNK {
                if let Err(e) = write_batch(&mut wr, &mut batch, &info).await {
                    debug!(error = %e, "write failed");
                    return;
                }
                last_write = Instant::now();
            }
        }
        if !batch.is_empty() {
            if let Err(e) = write_batch(&mut wr, &mut batch, &info).await {
                debug!(error = %e, "write failed");
                return;
            }
            last_write = Instant::now();
        }
        if stop {
            let _ = wr.shutdown().await;
            return;
        }
        for q in outbox.take_parked() {
            if let Some(q) = q.upgrade() {
                q.dispatch();
            }
        }
    }
}

/// Why a connection is closed when the store refused a write that a held reply depends on.
const STORE_REFUSED: &str = "the store refused a write this reply depends on";

/// How a wait for the store ended.
enum GateEnd {
    Committed,
    /// The store writer stopped: the ticket will never be committed.
    StoreStopped,
    /// The connection ended meanwhile (its outbox was closed).
    Closed,
}

/// Waits until the store commits `ticket` (the caller has just written everything before it),
/// sending heartbeats meanwhile: a reply held for the store during a database outage must not
/// make the client take the connection for dead. Gives up once the connection has ended.
async fn gate(
    wr: &mut (impl AsyncWrite + Unpin),
    store: &warren_storage::Writer,
    ticket: u64,
    heartbeat: &AtomicU16,
    outbox: &Outbox,
    info: &ConnInfo,
) -> std::io::Result<GateEnd> {
    let wait = store.wait(ticket);
    tokio::pin!(wait);
    let mut beat = WriteBatch::new();
    let mut last_write = Instant::now();
    loop {
        let hb = heartbeat.load(Ordering::Relaxed);
        let interval = (hb > 0).then(|| Duration::from_secs(hb as u64) / 2);
        // Without heartbeats, still look at the outbox now and then.
        let next = last_write + interval.unwrap_or(Duration::from_secs(1));
        tokio::select! {
            ok = &mut wait => {
                return Ok(if ok { GateEnd::Committed } else { GateEnd::StoreStopped });
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(next)) => {
                if outbox.is_closed() {
                    return Ok(GateEnd::Closed);
                }
                if interval.is_some() {
                    beat.push_heartbeat();
                    write_batch(wr, &mut beat, info).await?;
                }
                last_write = Instant::now();
            }
        }
    }
}

async fn write_batch(
    wr: &mut (impl AsyncWrite + Unpin),
    batch: &mut WriteBatch,
    info: &ConnInfo,
) -> std::io::Result<()> {
    while !batch.is_empty() {
        let n = {
            let mut slices = [std::io::IoSlice::new(&[]); 64];
            let k = batch.io_slices(&mut slices);
            wr.write_vectored(&slices[..k]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        info.stats.send_oct.add(n as u64);
        info.stats.send_cnt.inc();
        batch.advance(n);
    }
    Ok(())
}
