//! One AMQP 0-9-1 client connection: TCP connect, the handshake (protocol header, start/start-ok
//! with PLAIN, tune/tune-ok, open), synchronous setup calls on channel 1, and the two halves the
//! load loops use: a [`Reader`] (read buffer and `warren_protocol`'s frame decoder) and a
//! [`Writer`] (frames appended to one buffer and sent in one write, large zero paddings shared
//! rather than copied). Also the polite close.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::time::Duration;

use amq_protocol::protocol::{channel, connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use warren_protocol::codec::{Decoder, Frame};
use warren_protocol::encode::{encode_any, encode_heartbeat};
use warren_protocol::{AMQPFrame, FRAME_END, PROTOCOL_HEADER};

use crate::args::Target;

/// The one channel every load connection uses.
pub const CHANNEL: u16 = 1;
/// The smallest frame_max AMQP 0-9-1 allows.
const MIN_FRAME_MAX: u32 = 4096;
/// frame_max used when the server offers 0 (no limit).
const DEFAULT_FRAME_MAX: u32 = 131_072;
/// Read at least this much per read call.
const READ_CHUNK: usize = 64 * 1024;
/// Zero padding at least this long goes out as a shared slice (vectored write), not a copy.
const SHARE_ZEROS_AT: usize = 4096;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// An AMQP short string, refusing (instead of panicking on) more than 255 bytes.
pub fn short(s: &str) -> Result<ShortString> {
    ShortString::try_new(s).map_err(|e| anyhow!("{s:?}: {e}"))
}

/// The read half: socket, buffer and decoder.
pub struct Reader {
    rd: OwnedReadHalf,
    buf: BytesMut,
    dec: Decoder,
}

impl Reader {
    /// Reads more bytes from the socket; end of stream is an error.
    pub async fn fill(&mut self) -> Result<()> {
        let need = self.dec.needed(&self.buf).unwrap_or(0);
        let want = need.saturating_sub(self.buf.len()).max(READ_CHUNK);
        if self.buf.capacity() - self.buf.len() < want {
            self.buf.reserve(want);
        }
        let n = self
            .rd
            .read_buf(&mut self.buf)
            .await
            .context("reading from the broker")?;
        if n == 0 {
            bail!("the broker closed the connection");
        }
        Ok(())
    }

    /// The next complete frame in the buffer, if any.
    pub fn next(&mut self) -> Result<Option<Frame>> {
        self.dec
            .decode(&mut self.buf)
            .map_err(|e| anyhow!("undecodable frame from the broker: {e}"))
    }

    /// The next frame, reading as needed.
    pub async fn frame(&mut self) -> Result<Frame> {
        loop {
            if let Some(f) = self.next()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }
}

/// The write half: frames are appended, then [`Writer::flush`] sends them in as few writes as
/// the socket takes.
pub struct Writer {
    wr: OwnedWriteHalf,
    cur: BytesMut,
    chunks: VecDeque<Bytes>,
    scratch: Vec<u8>,
    zeros: Bytes,
}

impl Writer {
    pub fn new(wr: OwnedWriteHalf) -> Self {
        Writer {
            wr,
            cur: BytesMut::with_capacity(64 * 1024),
            chunks: VecDeque::new(),
            scratch: Vec::with_capacity(256),
            zeros: Bytes::new(),
        }
    }

    /// Appends a method frame, encoded by `amq-protocol`.
    pub fn method(&mut self, channel: u16, class: AMQPClass) -> Result<()> {
        self.scratch.clear();
        encode_any(&mut self.scratch, &AMQPFrame::Method(channel, class))
            .context("encoding a method frame")?;
        self.cur.extend_from_slice(&self.scratch);
        Ok(())
    }

    pub fn heartbeat(&mut self) {
        self.scratch.clear();
        encode_heartbeat(&mut self.scratch);
        self.cur.extend_from_slice(&self.scratch);
    }

    /// Appends bytes as they are (pre-encoded frames).
    pub fn raw(&mut self, b: &[u8]) {
        self.cur.extend_from_slice(b);
    }

    /// Appends a frame header: type, channel, payload size.
    pub fn frame_header(&mut self, kind: u8, channel: u16, size: usize) {
        self.cur.put_u8(kind);
        self.cur.put_u16(channel);
        self.cur.put_u32(size as u32);
    }

    pub fn frame_end(&mut self) {
        self.cur.put_u8(FRAME_END);
    }

    /// Appends `n` zero bytes; long runs are a slice of one shared zero buffer.
    pub fn zeros(&mut self, n: usize) {
        if n < SHARE_ZEROS_AT {
            self.cur.put_bytes(0, n);
            return;
        }
        if self.zeros.len() < n {
            self.zeros = Bytes::from(vec![0u8; n.max(DEFAULT_FRAME_MAX as usize)]);
        }
        self.seal();
        self.chunks.push_back(self.zeros.slice(..n));
    }

    fn seal(&mut self) {
        if !self.cur.is_empty() {
            self.chunks.push_back(self.cur.split().freeze());
        }
    }

    /// Writes everything appended so far.
    pub async fn flush(&mut self) -> Result<()> {
        if self.chunks.is_empty() {
            if !self.cur.is_empty() {
                self.wr
                    .write_all(&self.cur)
                    .await
                    .context("writing to the broker")?;
                self.cur.clear();
            }
            return Ok(());
        }
        self.seal();
        while !self.chunks.is_empty() {
            let mut slices = [IoSlice::new(&[]); 64];
            let mut n = 0;
            for c in self.chunks.iter().take(slices.len()) {
                slices[n] = IoSlice::new(c);
                n += 1;
            }
            let mut written = self
                .wr
                .write_vectored(&slices[..n])
                .await
                .context("writing to the broker")?;
            if written == 0 {
                bail!("the broker stopped accepting data");
            }
            while written > 0 {
                let Some(front) = self.chunks.front_mut() else {
                    break;
                };
                if front.len() <= written {
                    written -= front.len();
                    self.chunks.pop_front();
                } else {
                    front.advance(written);
                    written = 0;
                }
            }
        }
        Ok(())
    }
}

/// An open connection (handshake done, no channel yet).
pub struct Conn {
    pub reader: Reader,
    pub writer: Writer,
    /// Negotiated frame_max, framing included.
    pub frame_max: usize,
    /// Negotiated heartbeat interval in seconds (0: none).
    pub heartbeat: u16,
    /// The server's product and version, from connection.start.
    pub server: String,
}

fn client_properties(name: &str) -> FieldTable {
    let mut caps = FieldTable::default();
    for c in [
        "publisher_confirms",
        "consumer_cancel_notify",
        "basic.nack",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
    ] {
        caps.insert(c.into(), AMQPValue::Boolean(true));
    }
    let mut t = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v));
    t.insert("product".into(), s("warren-perf"));
    t.insert("version".into(), s(env!("CARGO_PKG_VERSION")));
    t.insert("platform".into(), s("Rust"));
    t.insert("connection_name".into(), s(name));
    t.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    t
}

fn table_str(t: &FieldTable, key: &str) -> String {
    match t.inner().get(key) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        Some(AMQPValue::ShortString(s)) => s.to_string(),
        _ => String::new(),
    }
}

/// Server-sent close reasons as an error.
fn closed_by_broker(what: &str, code: u16, text: &ShortString) -> anyhow::Error {
    anyhow!("{what} closed by the broker: {code} {text}")
}

/// Connects and runs the handshake; `name` is the connection name the broker shows.
pub async fn connect(target: &Target, name: &str) -> Result<Conn> {
    let addr = target.addr();
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(target, name))
        .await
        .map_err(|_| anyhow!("connecting to {addr}: handshake timed out"))?
        .with_context(|| format!("connecting to {addr}"))
}

async fn handshake(target: &Target, name: &str) -> Result<Conn> {
    let stream = TcpStream::connect(target.addr()).await?;
    stream.set_nodelay(true)?;
    let (rd, wr) = stream.into_split();
    let mut reader = Reader {
        rd,
        buf: BytesMut::with_capacity(READ_CHUNK),
        dec: Decoder::new(0),
    };
    let mut writer = Writer::new(wr);
    writer.raw(&PROTOCOL_HEADER);
    writer.flush().await?;

    // A server that does not speak 0-9-1 answers with its own protocol header.
    reader
        .fill()
        .await
        .context("waiting for connection.start")?;
    if reader.buf.starts_with(b"AMQP") {
        bail!(
            "the server refused AMQP 0-9-1 (it answered {:?})",
            &reader.buf[..]
        );
    }
    let start = match handshake_method(&mut reader, &mut writer).await? {
        AMQPClass::Connection(connection::AMQPMethod::Start(s)) => s,
        other => bail!("expected connection.start, got {other:?}"),
    };
    let server = format!(
        "{} {}",
        table_str(&start.server_properties, "product"),
        table_str(&start.server_properties, "version")
    );
    let mechanisms = start.mechanisms.to_string();
    if !mechanisms.split_whitespace().any(|m| m == "PLAIN") {
        bail!("the server does not offer PLAIN authentication (it offers {mechanisms:?})");
    }
    let response = format!("\0{}\0{}", target.user, target.pass);
    writer.method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: client_properties(name),
            mechanism: "PLAIN".into(),
            response: LongString::from(response),
            locale: "en_US".into(),
        })),
    )?;
    writer.flush().await?;

    let tune = match handshake_method(&mut reader, &mut writer)
        .await
        .with_context(|| format!("logging in as {:?}", target.user))?
    {
        AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => t,
        other => bail!("expected connection.tune, got {other:?}"),
    };
    let frame_max = if tune.frame_max == 0 {
        DEFAULT_FRAME_MAX
    } else {
        tune.frame_max
    };
    if frame_max < MIN_FRAME_MAX {
        bail!("the server offers frame_max {frame_max}, below the protocol's minimum of {MIN_FRAME_MAX}");
    }
    // Heartbeats only when the URI asks for them; then the smaller of the two non-zero values.
    let heartbeat = match (target.heartbeat, tune.heartbeat) {
        (0, _) => 0,
        (c, 0) => c,
        (c, s) => c.min(s),
    };
    reader.dec.set_frame_max(frame_max);
    writer.method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: tune.channel_max,
            frame_max,
            heartbeat,
        })),
    )?;
    writer.method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: short(&target.vhost)?,
        })),
    )?;
    writer.flush().await?;
    match handshake_method(&mut reader, &mut writer)
        .await
        .with_context(|| format!("opening vhost {:?}", target.vhost))?
    {
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) => {}
        other => bail!("expected connection.open-ok, got {other:?}"),
    }
    Ok(Conn {
        reader,
        writer,
        frame_max: frame_max as usize,
        heartbeat,
        server,
    })
}

/// The next method on channel 0 during the handshake; a connection.close is answered and
/// returned as an error, and a dropped socket is reported as a likely refusal.
async fn handshake_method(reader: &mut Reader, writer: &mut Writer) -> Result<AMQPClass> {
    loop {
        let frame = reader
            .frame()
            .await
            .context("the broker dropped the connection during the handshake (refused login?)")?;
        match frame {
            Frame::Heartbeat { .. } => continue,
            Frame::Method {
                class: AMQPClass::Connection(connection::AMQPMethod::Close(c)),
                ..
            } => {
                let _ = send_close_ok(writer).await;
                return Err(closed_by_broker("connection", c.reply_code, &c.reply_text));
            }
            Frame::Method { class, .. } => return Ok(class),
            other => bail!("unexpected frame during the handshake: {other:?}"),
        }
    }
}

async fn send_close_ok(writer: &mut Writer) -> Result<()> {
    writer.method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
    )?;
    writer.flush().await
}

impl Conn {
    /// Sends `class` on channel 1 and returns the next method the broker sends on it. A channel
    /// or connection close from the broker is answered and returned as an error.
    pub async fn call(&mut self, class: AMQPClass) -> Result<AMQPClass> {
        self.writer.method(CHANNEL, class)?;
        self.writer.flush().await?;
        loop {
            match self.reader.frame().await? {
                Frame::Method {
                    class: AMQPClass::Channel(channel::AMQPMethod::Close(c)),
                    ..
                } => {
                    self.writer.method(
                        CHANNEL,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    )?;
                    self.writer.flush().await?;
                    return Err(closed_by_broker("channel", c.reply_code, &c.reply_text));
                }
                Frame::Method {
                    class: AMQPClass::Connection(connection::AMQPMethod::Close(c)),
                    ..
                } => {
                    let _ = send_close_ok(&mut self.writer).await;
                    return Err(closed_by_broker("connection", c.reply_code, &c.reply_text));
                }
                // connection.blocked and friends on channel 0 do not answer anything.
                Frame::Method { channel: 0, .. } | Frame::Heartbeat { .. } => continue,
                Frame::Method { class, .. } => return Ok(class),
                // Content (a return) cannot answer a call.
                Frame::Header { .. } | Frame::Body { .. } | Frame::BodyInPlace { .. } => continue,
            }
        }
    }

    /// Opens channel 1.
    pub async fn open_channel(&mut self) -> Result<()> {
        match self
            .call(AMQPClass::Channel(channel::AMQPMethod::Open(
                channel::Open {},
            )))
            .await
            .context("channel.open")?
        {
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)) => Ok(()),
            other => bail!("expected channel.open-ok, got {other:?}"),
        }
    }

    /// Closes channel 1 (if open) and the connection.
    pub async fn close(mut self, channel_open: bool) -> Result<()> {
        close(&mut self.reader, &mut self.writer, channel_open).await
    }
}

/// Closes channel 1 (when `channel_open`) and then the connection, waiting for each close-ok
/// and discarding whatever else arrives meanwhile (deliveries, acks).
pub async fn close(reader: &mut Reader, writer: &mut Writer, channel_open: bool) -> Result<()> {
    tokio::time::timeout(CLOSE_TIMEOUT, async {
        if channel_open {
            writer.method(
                CHANNEL,
                AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                    reply_code: 200,
                    reply_text: "bye".into(),
                    class_id: 0,
                    method_id: 0,
                })),
            )?;
            writer.flush().await?;
            loop {
                match reader.frame().await? {
                    Frame::Method {
                        class: AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)),
                        ..
                    } => break,
                    // Both sides closed at once: that is as good as close-ok.
                    Frame::Method {
                        class: AMQPClass::Channel(channel::AMQPMethod::Close(_)),
                        ..
                    } => {
                        writer.method(
                            CHANNEL,
                            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                        )?;
                        writer.flush().await?;
                        break;
                    }
                    Frame::Method {
                        class: AMQPClass::Connection(connection::AMQPMethod::Close(c)),
                        ..
                    } => {
                        let _ = send_close_ok(writer).await;
                        return Err(closed_by_broker("connection", c.reply_code, &c.reply_text));
                    }
                    _ => continue,
                }
            }
        }
        writer.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            })),
        )?;
        writer.flush().await?;
        loop {
            match reader.frame().await {
                Ok(Frame::Method {
                    class: AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)),
                    ..
                }) => return Ok(()),
                Ok(Frame::Method {
                    class: AMQPClass::Connection(connection::AMQPMethod::Close(_)),
                    ..
                }) => {
                    let _ = send_close_ok(writer).await;
                    return Ok(());
                }
                Ok(_) => continue,
                // A broker may drop the socket right after close-ok was due.
                Err(_) => return Ok(()),
            }
        }
    })
    .await
    .map_err(|_| anyhow!("closing the connection timed out"))?
}
