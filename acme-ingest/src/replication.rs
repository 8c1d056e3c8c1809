//! A minimal replication-protocol connection (`replication=database`), built on
//! `postgres-protocol` because tokio-postgres cannot open one.
//!
//! It runs the walsender's simple commands, such as
//! `CREATE_REPLICATION_SLOT ... LOGICAL pgoutput EXPORT_SNAPSHOT`, whose exported snapshot is
//! exactly the state at the slot's consistent point: the snapshot-to-stream handoff then has
//! no gap and no overlap by construction. The exported snapshot lives as long as the
//! connection runs no other command, so keep the connection until every copy connection has
//! imported it.

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;

use crate::error::{IngestError, Result, reconnect_cures};
use crate::source::SourceUrl;

/// Bytes of free buffer space offered to each socket read.
const READ_CHUNK: usize = 256 * 1024;

/// A byte stream to the server: plain TCP or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A connection in logical replication mode.
pub struct ReplicationConnection {
    stream: Box<dyn Io>,
    read: BytesMut,
    target: String,
}

impl std::fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConnection").field("target", &self.target).finish()
    }
}

fn protocol(target: &str, message: impl std::fmt::Display) -> IngestError {
    IngestError::Replication { target: target.to_string(), message: message.to_string(), code: None }
}

impl ReplicationConnection {
    /// Connect to the source of `url` in `replication=database` mode (TCP hosts), encrypted
    /// as its `sslmode` says (see [`crate::tls`]). A server that does not finish
    /// the handshake within [`SourceUrl::timeout`] is an [`IngestError::Disconnected`].
    pub async fn connect(url: &SourceUrl) -> Result<Self> {
        url.bounded("opening a replication connection", Self::connect_unbounded(url)).await
    }

    async fn connect_unbounded(url: &SourceUrl) -> Result<Self> {
        let config = url.config();
        let target = url.to_string();
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(_)) => {
                return Err(protocol(&target, "replication over Unix sockets is not supported: use a TCP host"));
            }
            None => "localhost".to_string(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let stream = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| disconnected(&target, format!("cannot connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        let stream = match url.tls_client() {
            None => Box::new(stream) as Box<dyn Io>,
            Some(client) => tls(stream, &host, client, url).await?,
        };
        let mut conn = Self { stream, read: BytesMut::with_capacity(8192), target };
        let user = config.get_user().unwrap_or("postgres").to_string();
        let database = config.get_dbname().unwrap_or(&user).to_string();
        let mut buf = BytesMut::new();
        frontend::startup_message(
            [
                ("user", user.as_str()),
                ("database", database.as_str()),
                ("replication", "database"),
                ("application_name", "acme"),
            ],
            &mut buf,
        )
        .map_err(|e| protocol(&conn.target, e))?;
        conn.send(&buf).await?;
        let password = config.get_password().map(|p| p.to_vec());
        loop {
            match conn.receive().await? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    let password =
                        password.as_deref().ok_or_else(|| protocol(&conn.target, "the server asks for a password"))?;
                    let mut buf = BytesMut::new();
                    frontend::password_message(password, &mut buf).map_err(|e| protocol(&conn.target, e))?;
                    conn.send(&buf).await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let password =
                        password.as_deref().ok_or_else(|| protocol(&conn.target, "the server asks for a password"))?;
                    let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), password, body.salt());
                    let mut buf = BytesMut::new();
                    frontend::password_message(hash.as_bytes(), &mut buf).map_err(|e| protocol(&conn.target, e))?;
                    conn.send(&buf).await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let password =
                        password.as_deref().ok_or_else(|| protocol(&conn.target, "the server asks for a password"))?;
                    let mut mechanisms = body.mechanisms();
                    let mut scram = false;
                    while let Some(m) = mechanisms.next().map_err(|e| protocol(&conn.target, e))? {
                        scram |= m == SCRAM_SHA_256;
                    }
                    if !scram {
                        return Err(protocol(&conn.target, "the server offers no SCRAM-SHA-256 authentication"));
                    }
                    conn.scram(password).await?;
                }
                backend::Message::ReadyForQuery(_) => return Ok(conn),
                backend::Message::ErrorResponse(body) => return Err(conn.server_error(&body)),
                backend::Message::ParameterStatus(_)
                | backend::Message::BackendKeyData(_)
                | backend::Message::NoticeResponse(_) => {}
                _ => return Err(protocol(&conn.target, "unexpected message during startup")),
            }
        }
    }

    async fn scram(&mut self, password: &[u8]) -> Result<()> {
        let mut scram = ScramSha256::new(password, ChannelBinding::unsupported());
        let mut buf = BytesMut::new();
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut buf)
            .map_err(|e| protocol(&self.target, e))?;
        self.send(&buf).await?;
        match self.receive().await? {
            backend::Message::AuthenticationSaslContinue(body) => {
                scram.update(body.data()).map_err(|e| protocol(&self.target, e))?;
            }
            backend::Message::ErrorResponse(body) => return Err(self.server_error(&body)),
            _ => return Err(protocol(&self.target, "unexpected SASL message")),
        }
        let mut buf = BytesMut::new();
        frontend::sasl_response(scram.message(), &mut buf).map_err(|e| protocol(&self.target, e))?;
        self.send(&buf).await?;
        match self.receive().await? {
            backend::Message::AuthenticationSaslFinal(body) => {
                scram.finish(body.data()).map_err(|e| protocol(&self.target, e))?;
                Ok(())
            }
            backend::Message::ErrorResponse(body) => Err(self.server_error(&body)),
            _ => Err(protocol(&self.target, "unexpected SASL message")),
        }
    }

    /// Run one simple command and return its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).map_err(|e| protocol(&self.target, e))?;
        self.send(&buf).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.receive().await? {
                backend::Message::DataRow(body) => {
                    let buffer = body.buffer();
                    let mut ranges = body.ranges();
                    let mut row = Vec::new();
                    while let Some(range) = ranges.next().map_err(|e| protocol(&self.target, e))? {
                        row.push(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned()));
                    }
                    rows.push(row);
                }
                backend::Message::ErrorResponse(body) => error = Some(self.server_error(&body)),
                backend::Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Close the connection politely.
    pub async fn close(mut self) {
        let mut buf = BytesMut::new();
        frontend::terminate(&mut buf);
        let _ = self.stream.write_all(&buf).await;
    }

    async fn send(&mut self, buf: &[u8]) -> Result<()> {
        self.stream.write_all(buf).await.map_err(|e| disconnected(&self.target, format!("write failed: {e}")))
    }

    async fn receive(&mut self) -> Result<backend::Message> {
        loop {
            if let Some(message) = backend::Message::parse(&mut self.read).map_err(|e| protocol(&self.target, e))? {
                return Ok(message);
            }
            self.fill().await?;
        }
    }

    /// Read more bytes from the server into the buffer (cancel-safe).
    async fn fill(&mut self) -> Result<()> {
        // Read in large chunks: a full buffer would otherwise grow by a few bytes per call,
        // one system call per small message.
        self.read.reserve(READ_CHUNK);
        let n = self
            .stream
            .read_buf(&mut self.read)
            .await
            .map_err(|e| disconnected(&self.target, format!("read failed: {e}")))?;
        if n == 0 {
            return Err(disconnected(&self.target, "the server closed the connection"));
        }
        Ok(())
    }

    fn server_error(&self, body: &backend::ErrorResponseBody) -> IngestError {
        let mut fields = body.fields();
        let mut message = String::new();
        let mut detail = String::new();
        let mut code = String::new();
        while let Ok(Some(field)) = fields.next() {
            match field.type_() {
                b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
                b'D' => detail = format!(" ({})", String::from_utf8_lossy(field.value_bytes())),
                b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
                _ => {}
            }
        }
        let sqlstate = SqlState::from_code(&code);
        if reconnect_cures(&sqlstate) {
            // Shut down, restarting, or the connection broke: worth reconnecting.
            return disconnected(&self.target, format!("{message}{detail} (SQLSTATE {code})"));
        }
        let advice = if sqlstate == SqlState::INSUFFICIENT_PRIVILEGE
            || sqlstate == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            ": the user needs the REPLICATION privilege and a pg_hba.conf replication entry"
        } else {
            ""
        };
        IngestError::Replication {
            target: self.target.clone(),
            message: format!("{message}{detail} (SQLSTATE {code}){advice}"),
            code: Some(sqlstate),
        }
    }
}

/// What `CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// Consistent point: the stream starts here.
    pub consistent_point: String,
    /// Name of the exported snapshot (valid while the creating connection stays idle).
    pub snapshot_name: String,
}

/// Create a logical slot with `pgoutput` and export its snapshot.
pub async fn create_slot_exporting_snapshot(conn: &mut ReplicationConnection, slot: &str) -> Result<CreatedSlot> {
    create_slot(conn, slot, "").await
}

/// Create a temporary logical slot (dropped when `conn` closes) and export its snapshot: a
/// snapshot of the source that holds exactly the transactions committed before its consistent
/// point, for reading the source at one LSN.
pub async fn create_temporary_slot_exporting_snapshot(
    conn: &mut ReplicationConnection,
    slot: &str,
) -> Result<CreatedSlot> {
    create_slot(conn, slot, "TEMPORARY ").await
}

async fn create_slot(conn: &mut ReplicationConnection, slot: &str, kind: &str) -> Result<CreatedSlot> {
    let rows = conn
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} {kind}LOGICAL pgoutput EXPORT_SNAPSHOT",
            crate::source::quote_ident(slot)
        ))
        .await?;
    let row = rows.first().ok_or_else(|| protocol(&conn.target, "CREATE_REPLICATION_SLOT returned no row"))?;
    match (row.get(1).cloned().flatten(), row.get(2).cloned().flatten()) {
        (Some(consistent_point), Some(snapshot_name)) => Ok(CreatedSlot { consistent_point, snapshot_name }),
        _ => Err(protocol(&conn.target, "CREATE_REPLICATION_SLOT returned no snapshot")),
    }
}

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// One message of a logical replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// WAL data: one pgoutput message.
    XLogData {
        /// WAL position of the message's record.
        wal_start: u64,
        /// The server's current WAL end.
        wal_end: u64,
        /// The pgoutput message (see [`crate::pgoutput::decode`]).
        data: bytes::Bytes,
    },
    /// Primary keepalive: how far the server has decoded, and whether it wants a status reply.
    Keepalive {
        /// Everything before this position has been sent.
        wal_end: u64,
        /// The server asks for an immediate standby status update.
        reply_requested: bool,
    },
}

/// A connection streaming a logical slot (`START_REPLICATION ... LOGICAL`, CopyBoth mode).
///
/// Reads are cancel-safe: a [`LogicalStream::next`] dropped at an `.await` (for example by a
/// timeout) loses no data.
pub struct LogicalStream {
    conn: ReplicationConnection,
    slot: String,
    heard: std::time::Instant,
}

impl std::fmt::Debug for LogicalStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalStream").field("target", &self.conn.target).field("slot", &self.slot).finish()
    }
}

impl ReplicationConnection {
    /// Start streaming `slot` with `pgoutput` from `start` (`0/0`: from the slot's confirmed
    /// position) for `publication`, with binary tuples and logical messages.
    pub async fn start_logical(mut self, slot: &str, start: u64, publication: &str) -> Result<LogicalStream> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names '{}', binary 'true', \
             messages 'true')",
            crate::source::quote_ident(slot),
            acme_core::Lsn(start),
            crate::source::quote_ident(publication).replace('\'', "''"),
        );
        let mut buf = BytesMut::new();
        frontend::query(&sql, &mut buf).map_err(|e| protocol(&self.target, e))?;
        self.send(&buf).await?;
        loop {
            let (tag, frame) = self.receive_frame().await?;
            match tag {
                b'W' => {
                    return Ok(LogicalStream { conn: self, slot: slot.to_string(), heard: std::time::Instant::now() });
                }
                b'E' => return Err(self.frame_error(frame)),
                b'N' | b'S' => {}
                other => {
                    return Err(protocol(
                        &self.target,
                        format!("unexpected message `{}` after START_REPLICATION", other as char),
                    ));
                }
            }
        }
    }

    /// Read one whole protocol frame (tag, frame bytes including the header).
    async fn receive_frame(&mut self) -> Result<(u8, bytes::Bytes)> {
        loop {
            if self.read.len() >= 5 {
                let len = u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]]) as usize;
                if len < 4 {
                    return Err(protocol(&self.target, "invalid frame length"));
                }
                if self.read.len() > len {
                    let frame = self.read.split_to(len + 1).freeze();
                    return Ok((frame[0], frame));
                }
                self.read.reserve(len + 1 - self.read.len());
            }
            self.fill().await?;
        }
    }

    fn frame_error(&self, frame: bytes::Bytes) -> IngestError {
        let mut buf = BytesMut::from(&frame[..]);
        match backend::Message::parse(&mut buf) {
            Ok(Some(backend::Message::ErrorResponse(body))) => self.server_error(&body),
            _ => protocol(&self.target, "malformed error response"),
        }
    }
}

impl LogicalStream {
    /// The next event; `None` when the server ended the stream (CopyDone).
    pub async fn next(&mut self) -> Result<Option<StreamEvent>> {
        loop {
            let (tag, frame) = self.conn.receive_frame().await?;
            self.heard = std::time::Instant::now();
            match tag {
                b'd' => {
                    let body = frame.slice(5..);
                    let bad = |what: &str| IngestError::BadMessage { message: format!("replication {what}") };
                    match body.first() {
                        Some(b'w') if body.len() >= 25 => {
                            let wal_start = u64::from_be_bytes(body[1..9].try_into().map_err(|_| bad("XLogData"))?);
                            let wal_end = u64::from_be_bytes(body[9..17].try_into().map_err(|_| bad("XLogData"))?);
                            return Ok(Some(StreamEvent::XLogData { wal_start, wal_end, data: body.slice(25..) }));
                        }
                        Some(b'k') if body.len() >= 18 => {
                            let wal_end = u64::from_be_bytes(body[1..9].try_into().map_err(|_| bad("keepalive"))?);
                            return Ok(Some(StreamEvent::Keepalive { wal_end, reply_requested: body[17] == 1 }));
                        }
                        _ => return Err(bad("message of an unknown kind")),
                    }
                }
                b'c' => return Ok(None),
                b'E' => return Err(self.conn.frame_error(frame)),
                _ => {} // notices, parameter status
            }
        }
    }

    /// How long since the server last sent anything (data, keepalive or notice).
    pub fn silent_for(&self) -> std::time::Duration {
        self.heard.elapsed()
    }

    /// Send a standby status update: everything before `flushed` is durable in the warehouse
    /// (the server may release that WAL and moves the slot's confirmed position there).
    pub async fn send_status(&mut self, flushed: u64, reply_requested: bool) -> Result<()> {
        let now = chrono::Utc::now().timestamp_micros() - PG_EPOCH_OFFSET_MICROS;
        let mut payload = Vec::with_capacity(34);
        payload.push(b'r');
        for lsn in [flushed, flushed, flushed] {
            payload.extend_from_slice(&lsn.to_be_bytes());
        }
        payload.extend_from_slice(&now.to_be_bytes());
        payload.push(u8::from(reply_requested));
        let mut buf = Vec::with_capacity(39);
        buf.push(b'd');
        buf.extend_from_slice(&(payload.len() as u32 + 4).to_be_bytes());
        buf.extend_from_slice(&payload);
        self.conn.send(&buf).await
    }

    /// End the stream and close the connection.
    pub async fn close(mut self) {
        let mut buf = BytesMut::new();
        frontend::copy_done(&mut buf);
        let _ = self.conn.stream.write_all(&buf).await;
        self.conn.close().await;
    }
}

/// Ask the server for TLS (`SSLRequest`) and wrap the connection when it accepts; a server
/// that refuses is an error when the URL's `sslmode` requires TLS, and the plain connection
/// is kept otherwise. A refused server certificate is an [`IngestError::Certificate`].
async fn tls(
    mut stream: TcpStream,
    host: &str,
    client: std::sync::Arc<rustls::ClientConfig>,
    url: &SourceUrl,
) -> Result<Box<dyn Io>> {
    let target = &url.to_string();
    let mode = url.ssl_mode();
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    stream.write_all(&buf).await.map_err(|e| disconnected(target, format!("write failed: {e}")))?;
    let answer = stream.read_u8().await.map_err(|e| disconnected(target, format!("read failed: {e}")))?;
    match answer {
        b'S' => {
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| protocol(target, format!("`{host}` is not a valid TLS server name: {e}")))?;
            let connector = tokio_rustls::TlsConnector::from(client);
            let stream =
                connector.connect(name, stream).await.map_err(|e| match crate::tls::certificate_problem(&e) {
                    Some(problem) => IngestError::Certificate { target: target.clone(), mode, problem },
                    None => protocol(target, format!("TLS handshake failed: {e}")),
                })?;
            Ok(Box::new(stream))
        }
        b'N' if mode.requires_tls() => Err(protocol(
            target,
            format!(
                "the server does not accept TLS connections, but the URL asks for sslmode={mode} \
                 (enable ssl on the server, or use sslmode=prefer or disable)"
            ),
        )),
        b'N' => Ok(Box::new(stream)),
        other => Err(protocol(target, format!("unexpected answer {other:#04x} to the TLS request"))),
    }
}

fn disconnected(target: &str, message: impl std::fmt::Display) -> IngestError {
    IngestError::Disconnected { target: target.to_string(), message: message.to_string() }
}
