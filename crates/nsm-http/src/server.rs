//! The accept loop: hyper's HTTP/1.1 connections, over TCP or TLS, with the limits axum's own
//! `serve` lacks (it has no timer and takes every connection offered).
//!
//! - **Connections.** Each counts against [`Limits::max_connections`] from its accept, TLS
//!   handshake included. One more closes the connection waiting longest for a request; when
//!   every connection is busy with one, the new one is closed at once. Connections therefore
//!   never take the file descriptors RocksDB and the Kafka clients need, and a flood of idle
//!   connections cannot lock scrapes out: a scrape sends its request as soon as it connects.
//! - **Timeouts.** A new connection must have sent a whole request head (after its TLS
//!   handshake) within [`Limits::header_timeout`]; a connection waiting for its next request
//!   is closed after [`Limits::idle_timeout`], and once the next request's first byte arrives
//!   its head must follow within the header timeout. A request being handled has no deadline
//!   here: the handlers bound their own work.
//!
//! The connection itself tells what it is doing: its reads mark the first byte of a request,
//! and its service marks a request from the moment its head is parsed until its response is
//! ready.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

/// How long connections may wait, and how many may be open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// To send a request's head: from the connection's start (its TLS handshake included),
    /// or from the first byte of a request after an idle wait.
    pub header_timeout: Duration,
    /// To wait for the next request on a kept-alive connection.
    pub idle_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Default for Limits {
    /// The defaults of `[http]`.
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            max_connections: 256,
        }
    }
}

/// How often, at most, the log says the connection limit was reached.
const LIMIT_WARNING_INTERVAL: Duration = Duration::from_secs(60);
/// A pause after a failed accept (out of file descriptors, most likely), instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `router` on `listener`, over TLS when `tls` is set, until `shutdown` completes; then
/// stops accepting, closes idle connections, lets requests being handled finish, and returns
/// once every connection is closed.
pub(crate) async fn serve_router(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let connections = Arc::new(Connections::new(limits.max_connections));
    let (stop_sender, stop) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, client) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(error = %error, "cannot accept a connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        // Refused: the stream is dropped here, which closes it.
        let Some(slot) = connections.admit(limits) else {
            debug!(client = %client, "connection refused: every connection is busy");
            continue;
        };
        tokio::spawn(connection(
            stream,
            client,
            tls.clone(),
            router.clone(),
            slot,
            stop.clone(),
        ));
    }
    drop(listener);
    let _ = stop_sender.send(true);
    drop(stop);
    // Every connection's task holds a receiver.
    stop_sender.closed().await;
    Ok(())
}

/// One connection, from its accept to its close.
async fn connection(
    stream: TcpStream,
    client: SocketAddr,
    tls: Option<TlsAcceptor>,
    router: Router,
    slot: Slot,
    mut stop: watch::Receiver<bool>,
) {
    let activity = slot.activity.clone();
    let outcome = match tls {
        None => serve_http(stream, router, &activity, &mut stop).await,
        Some(acceptor) => match handshake(stream, &acceptor, &activity, &mut stop).await {
            Ok(tls) => serve_http(tls, router, &activity, &mut stop).await,
            Err(closed) => closed,
        },
    };
    match outcome {
        Closed::Done => {}
        Closed::Failed(error) => debug!(client = %client, error, "connection failed"),
        Closed::TimedOut => debug!(client = %client, "connection closed: no request in time"),
        Closed::Evicted => debug!(client = %client, "idle connection closed for a new one"),
    }
    drop(slot);
}

/// The TLS handshake, within the new connection's header timeout.
async fn handshake(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    activity: &Activity,
    stop: &mut watch::Receiver<bool>,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, Closed> {
    let deadline = activity.deadline().unwrap_or_else(Instant::now);
    tokio::select! {
        done = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => match done {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(error)) => Err(Closed::Failed(error.to_string())),
            Err(_) => Err(Closed::TimedOut),
        },
        () = activity.evicted.notified() => Err(Closed::Evicted),
        () = stopped(stop) => Err(Closed::Done),
    }
}

/// Why a connection ended.
enum Closed {
    /// Closed by the client, after a response without keep-alive, or at shutdown.
    Done,
    Failed(String),
    TimedOut,
    Evicted,
}

/// Completes once the server stops.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the server is gone: stopped too.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// HTTP/1.1 on `io` until the client closes, a deadline passes, the connection is evicted
/// or the server stops.
async fn serve_http<I>(
    io: I,
    router: Router,
    activity: &Arc<Activity>,
    stop: &mut watch::Receiver<bool>,
) -> Closed
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Tracked {
        io,
        activity: activity.clone(),
    });
    let router = TowerToHyperService::new(router);
    let request_activity = activity.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let busy = request_activity.begin_request();
        let response = router.call(request);
        async move {
            let response: Result<Response, Infallible> = response.await;
            drop(busy);
            response
        }
    });
    let mut connection = pin!(http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service));
    let mut stop_signal = pin!(stopped(stop));
    let mut stopping = false;
    loop {
        // Far enough for "no deadline": a change of phase wakes the loop before.
        let deadline = activity
            .deadline()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            done = connection.as_mut() => {
                return match done {
                    Ok(()) => Closed::Done,
                    Err(error) => Closed::Failed(error.to_string()),
                };
            }
            () = &mut stop_signal, if !stopping => {
                // Closes the connection if idle, after the response being made otherwise.
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
            () = activity.evicted.notified() => return Closed::Evicted,
            () = activity.changed.notified() => {}
            () = tokio::time::sleep_until(deadline) => {
                if activity.deadline().is_some_and(|deadline| deadline <= Instant::now()) {
                    return Closed::TimedOut;
                }
            }
        }
    }
}

/// The open connections, for the limit.
struct Connections {
    limit: usize,
    state: Mutex<Registry>,
}

struct Registry {
    next_id: u64,
    open: HashMap<u64, Arc<Activity>>,
    /// Connections closed or refused for the limit since the last warning.
    evicted: u64,
    refused: u64,
    last_warning: Option<Instant>,
}

impl Connections {
    fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            state: Mutex::new(Registry {
                next_id: 0,
                open: HashMap::new(),
                evicted: 0,
                refused: 0,
                last_warning: None,
            }),
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A slot for a new connection: at the limit, the connection waiting longest for a
    /// request is told to close; `None` when every connection is handling one.
    fn admit(self: &Arc<Self>, limits: Limits) -> Option<Slot> {
        let mut registry = self.registry();
        if registry.open.len() >= self.limit {
            let longest_idle = registry
                .open
                .iter()
                .filter_map(|(id, activity)| activity.waiting_since().map(|since| (since, *id)))
                .min();
            match longest_idle.and_then(|(_, id)| registry.open.remove(&id)) {
                Some(evicted) => {
                    evicted.evicted.notify_one();
                    registry.evicted += 1;
                }
                None => registry.refused += 1,
            }
            let now = Instant::now();
            if registry
                .last_warning
                .is_none_or(|last| now.duration_since(last) >= LIMIT_WARNING_INTERVAL)
            {
                warn!(
                    max_connections = self.limit,
                    idle_closed = registry.evicted,
                    refused = registry.refused,
                    "HTTP connection limit reached: idle connections are closed for new ones, \
                     and new ones refused while every connection is handling a request \
                     (http.max_connections)"
                );
                registry.last_warning = Some(now);
                registry.evicted = 0;
                registry.refused = 0;
            }
            if registry.open.len() >= self.limit {
                return None;
            }
        }
        let id = registry.next_id;
        registry.next_id += 1;
        let activity = Arc::new(Activity::new(limits));
        registry.open.insert(id, activity.clone());
        Some(Slot {
            id,
            activity,
            connections: self.clone(),
        })
    }
}

/// A connection's place under the limit, given back when dropped.
struct Slot {
    id: u64,
    activity: Arc<Activity>,
    connections: Arc<Connections>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Gone already if evicted.
        self.connections.registry().open.remove(&self.id);
    }
}

/// What a connection is doing, as its deadline and the limit see it.
struct Activity {
    limits: Limits,
    phase: Mutex<Phase>,
    /// The phase changed: the deadline is to be read again.
    changed: Notify,
    /// Closed for a new connection.
    evicted: Notify,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request since `since` (the connection's start, or its last response).
    Waiting {
        since: Instant,
        deadline: Instant,
        /// A new connection: its deadline covers its whole first head, whenever it begins.
        new: bool,
        /// Part of the next request has arrived.
        head_begun: bool,
    },
    /// Handling a request, from its parsed head to its response.
    Busy,
}

impl Activity {
    fn new(limits: Limits) -> Self {
        let now = Instant::now();
        Self {
            limits,
            phase: Mutex::new(Phase::Waiting {
                since: now,
                deadline: now + limits.header_timeout,
                new: true,
                head_begun: false,
            }),
            changed: Notify::new(),
            evicted: Notify::new(),
        }
    }

    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// When the connection is closed unless a request arrives; `None` while one is handled.
    fn deadline(&self) -> Option<Instant> {
        match *self.phase() {
            Phase::Waiting { deadline, .. } => Some(deadline),
            Phase::Busy => None,
        }
    }

    /// Since when the connection waits for a request; `None` while one is handled.
    fn waiting_since(&self) -> Option<Instant> {
        match *self.phase() {
            Phase::Waiting { since, .. } => Some(since),
            Phase::Busy => None,
        }
    }

    /// Bytes arrived: the first of a request after an idle wait gives its head the header
    /// timeout from now.
    fn bytes_read(&self) {
        let mut phase = self.phase();
        if let Phase::Waiting {
            deadline,
            new,
            head_begun,
            ..
        } = &mut *phase
        {
            if !*head_begun {
                *head_begun = true;
                if !*new {
                    *deadline = Instant::now() + self.limits.header_timeout;
                    drop(phase);
                    self.changed.notify_one();
                }
            }
        }
    }

    /// A request's head was parsed; waiting again once the returned guard is dropped.
    fn begin_request(self: &Arc<Self>) -> RequestGuard {
        *self.phase() = Phase::Busy;
        RequestGuard {
            activity: self.clone(),
        }
    }
}

/// A request being handled.
struct RequestGuard {
    activity: Arc<Activity>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let now = Instant::now();
        *self.activity.phase() = Phase::Waiting {
            since: now,
            deadline: now + self.activity.limits.idle_timeout,
            new: false,
            head_begun: false,
        };
        self.activity.changed.notify_one();
    }
}

/// A connection's stream, telling its activity when bytes arrive.
struct Tracked<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;

    struct Server {
        address: SocketAddr,
        stop: oneshot::Sender<()>,
        task: JoinHandle<io::Result<()>>,
    }

    /// `/` answers at once, `/slow` after 1.5 s.
    async fn start(limits: Limits, tls: Option<TlsAcceptor>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let router = Router::new().route("/", get(|| async { "ok\n" })).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                "slow\n"
            }),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_router(listener, router, tls, limits, async move {
            let _ = stopped.await;
        }));
        Server {
            address,
            stop,
            task,
        }
    }

    fn limits(header_ms: u64, idle_ms: u64, max_connections: usize) -> Limits {
        Limits {
            header_timeout: Duration::from_millis(header_ms),
            idle_timeout: Duration::from_millis(idle_ms),
            max_connections,
        }
    }

    /// Some bytes of `stream`, 0 once closed (tokio's `io-util` is not among its features).
    async fn read_some(stream: &TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            stream.readable().await?;
            match stream.try_read(buffer) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                read => return read,
            }
        }
    }

    async fn write_all(stream: &TcpStream, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            stream.writable().await.expect("writable");
            match stream.try_write(bytes) {
                Ok(written) => bytes = &bytes[written..],
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => panic!("write: {error}"),
            }
        }
    }

    async fn connect(server: &Server) -> TcpStream {
        let stream = TcpStream::connect(server.address).await.expect("connect");
        // Let the server accept it, so connections are admitted in the order they were made.
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream
    }

    /// How long until the server closes `stream`, reading whatever it sends; `None` if it is
    /// still open after `patience`.
    async fn time_to_close(stream: &TcpStream, patience: Duration) -> Option<Duration> {
        let started = std::time::Instant::now();
        let mut buffer = [0; 4096];
        loop {
            let left = patience.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, read_some(stream, &mut buffer)).await {
                Err(_) => return None,
                Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// A keep-alive GET on `stream`: the response's body.
    async fn get_on(stream: &TcpStream, path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nHost: nsm\r\n\r\n");
        write_all(stream, request.as_bytes()).await;
        let mut response = Vec::new();
        let mut buffer = [0; 4096];
        loop {
            let read = tokio::time::timeout(Duration::from_secs(5), read_some(stream, &mut buffer))
                .await
                .expect("a response in time")
                .expect("read");
            assert!(read > 0, "closed before the response");
            response.extend_from_slice(&buffer[..read]);
            let text = String::from_utf8_lossy(&response).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length: "))
                    .and_then(|length| length.parse().ok())
                    .expect("content-length");
                if body.len() >= length {
                    return body.to_string();
                }
            }
        }
    }

    #[tokio::test]
    async fn a_connection_without_a_whole_request_head_is_closed_after_the_header_timeout() {
        let server = start(limits(300, 10_000, 8), None).await;
        let silent = connect(&server).await;
        let partial = connect(&server).await;
        write_all(&partial, b"GET / HTTP/1.1\r\nHost: nsm\r\n").await;
        let closed = time_to_close(&silent, Duration::from_secs(5)).await;
        let closed = closed.expect("closed");
        // 300 ms after its accept, 50 ms before the clock started.
        assert!(
            closed >= Duration::from_millis(150) && closed < Duration::from_secs(2),
            "{closed:?}"
        );
        let closed = time_to_close(&partial, Duration::from_secs(5)).await;
        assert!(
            closed.expect("closed") < Duration::from_secs(2),
            "{closed:?}"
        );
        // Still serving.
        let stream = connect(&server).await;
        assert_eq!(get_on(&stream, "/").await, "ok\n");
    }

    #[tokio::test]
    async fn a_kept_alive_connection_waits_the_idle_timeout_then_its_head_the_header_timeout() {
        let server = start(limits(300, 1500, 8), None).await;
        let stream = connect(&server).await;
        assert_eq!(get_on(&stream, "/").await, "ok\n");
        // Longer than the header timeout, within the idle one: still open.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(get_on(&stream, "/").await, "ok\n");
        // A head begun after an idle wait has the header timeout from its first byte.
        tokio::time::sleep(Duration::from_millis(700)).await;
        write_all(&stream, b"GET / HTTP/1.1\r\n").await;
        let closed = time_to_close(&stream, Duration::from_secs(5)).await;
        let closed = closed.expect("closed");
        assert!(
            closed >= Duration::from_millis(200) && closed < Duration::from_millis(1200),
            "{closed:?}"
        );

        let idle = connect(&server).await;
        assert_eq!(get_on(&idle, "/").await, "ok\n");
        let closed = time_to_close(&idle, Duration::from_secs(5)).await;
        let closed = closed.expect("closed");
        assert!(
            closed >= Duration::from_millis(1300) && closed < Duration::from_secs(3),
            "{closed:?}"
        );
    }

    #[tokio::test]
    async fn over_the_limit_the_longest_idle_connection_makes_room() {
        let server = start(limits(10_000, 10_000, 3), None).await;
        let oldest = connect(&server).await;
        let second = connect(&server).await;
        let third = connect(&server).await;
        let scrape = connect(&server).await;
        assert_eq!(get_on(&scrape, "/").await, "ok\n");
        let closed = time_to_close(&oldest, Duration::from_secs(2)).await;
        assert!(closed.is_some(), "the longest idle connection is closed");
        // The scrape, now idle, is the newest: the next one closes `second`.
        let next = connect(&server).await;
        assert_eq!(get_on(&next, "/").await, "ok\n");
        assert!(time_to_close(&second, Duration::from_secs(2))
            .await
            .is_some());
        assert_eq!(
            time_to_close(&third, Duration::from_millis(300)).await,
            None,
            "the others stay open"
        );
    }

    #[tokio::test]
    async fn over_the_limit_a_new_connection_is_refused_while_every_one_is_busy() {
        let server = start(limits(10_000, 10_000, 2), None).await;
        let mut busy = Vec::new();
        for _ in 0..2 {
            let stream = connect(&server).await;
            write_all(&stream, b"GET /slow HTTP/1.1\r\nHost: nsm\r\n\r\n").await;
            busy.push(stream);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let refused = TcpStream::connect(server.address).await.expect("connect");
        let closed = time_to_close(&refused, Duration::from_secs(1)).await;
        assert!(closed.is_some(), "closed at once, without a response");
        // Once answered, the busy connections are idle and make room again.
        tokio::time::sleep(Duration::from_millis(1600)).await;
        let stream = connect(&server).await;
        assert_eq!(get_on(&stream, "/").await, "ok\n");
    }

    #[tokio::test]
    async fn a_tls_connection_without_a_handshake_is_closed_after_the_header_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let cert_file = dir.path().join("tls.crt");
        let key_file = dir.path().join("tls.key");
        std::fs::write(&cert_file, certified.cert.pem()).expect("write");
        std::fs::write(&key_file, certified.signing_key.serialize_pem()).expect("write");
        let config = crate::tls::server_config(&cert_file, &key_file).expect("config");
        let server = start(limits(300, 10_000, 8), Some(TlsAcceptor::from(config))).await;
        let silent = connect(&server).await;
        let closed = time_to_close(&silent, Duration::from_secs(5)).await;
        let closed = closed.expect("closed");
        assert!(closed < Duration::from_secs(2), "{closed:?}");
    }

    #[tokio::test]
    async fn a_stop_closes_idle_connections_and_lets_requests_finish() {
        let server = start(limits(10_000, 10_000, 8), None).await;
        let idle = connect(&server).await;
        let busy = connect(&server).await;
        write_all(&busy, b"GET /slow HTTP/1.1\r\nHost: nsm\r\n\r\n").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = server.stop.send(());
        assert!(time_to_close(&idle, Duration::from_secs(1)).await.is_some());
        let mut response = Vec::new();
        let mut buffer = [0; 4096];
        loop {
            let read = read_some(&busy, &mut buffer).await.expect("read");
            if read == 0 {
                break;
            }
            response.extend_from_slice(&buffer[..read]);
        }
        let response = String::from_utf8_lossy(&response);
        assert!(response.ends_with("slow\n"), "{response}");
        tokio::time::timeout(Duration::from_secs(2), server.task)
            .await
            .expect("the server returns")
            .expect("joined")
            .expect("served");
    }
}
