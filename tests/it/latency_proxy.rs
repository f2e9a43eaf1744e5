//! A TCP proxy that puts a network between the engine and PostgreSQL: every byte is forwarded
//! after a fixed delay (half the round trip each way), in order, without waiting for answers, so
//! pipelined requests stay pipelined. It counts the client's *flights*: bursts the client sends
//! after the server has answered something (a round trip the client waited for), which is how
//! the tests and the benchmark count round trips without trusting the engine's own counter.
//!
//! [`LatencyProxy::cut`] drops every open connection at once, as a failing network does: the
//! engine sees an I/O error (no SQLSTATE), possibly with a COMMIT sent and its answer lost.
//!
//! A fixture of the integration tests and of `cargo bench` (which includes this file by path);
//! not part of the product. It runs on a thread of its own, so sync tests can use it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A running proxy; it stops accepting (and its thread ends) when dropped.
pub struct LatencyProxy {
    addr: SocketAddr,
    flights: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl LatencyProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`
    /// (`host:port`), delaying each direction by `rtt / 2`.
    pub fn start(upstream: &str, rtt: Duration) -> LatencyProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the proxy's address");
        let flights = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (upstream, counted, stopping) = (upstream.to_string(), flights.clone(), stop.clone());
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        std::thread::Builder::new()
            .name("latency-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("the proxy's runtime");
                rt.block_on(serve(listener, upstream, rtt / 2, counted, stopping, cuts));
                // Connections still open end with the runtime.
                rt.shutdown_background();
            })
            .expect("the proxy's thread");
        LatencyProxy {
            addr,
            flights,
            stop,
            cut,
        }
    }

    /// Drops every connection open now, in both directions, without a goodbye.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// `host:port` to connect to instead of the server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Client flights (round trips waited for) over every connection so far.
    pub fn flights(&self) -> u64 {
        self.flights.load(Ordering::SeqCst)
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

async fn serve(
    listener: std::net::TcpListener,
    upstream: String,
    delay: Duration,
    flights: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    cuts: tokio::sync::watch::Receiver<u64>,
) {
    let listener = TcpListener::from_std(listener).expect("a tokio listener");
    while !stop.load(Ordering::SeqCst) {
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        let Ok(Ok((client, _))) = accepted else {
            continue;
        };
        let (upstream, flights, mut cuts) = (upstream.clone(), flights.clone(), cuts.clone());
        cuts.mark_unchanged();
        tokio::spawn(async move {
            if let Ok(server) = TcpStream::connect(&upstream).await {
                tokio::select! {
                    _ = relay(client, server, delay, flights) => {}
                    // Dropping the relay drops both sockets.
                    _ = cuts.changed() => {}
                }
            }
        });
    }
}

/// Forwards both directions of one connection until either side closes.
async fn relay(client: TcpStream, server: TcpStream, delay: Duration, flights: Arc<AtomicU64>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Whether the server sent something since the client's last burst.
    let answered = Arc::new(AtomicBool::new(true));
    let up = pump(
        client_read,
        server_write,
        delay,
        Side::Client {
            answered: answered.clone(),
            flights,
        },
    );
    let down = pump(server_read, client_write, delay, Side::Server { answered });
    tokio::join!(up, down);
}

/// Which side a direction reads from, and what it tells the flight count.
enum Side {
    /// A burst from the client after an answer is a new flight.
    Client {
        answered: Arc<AtomicBool>,
        flights: Arc<AtomicU64>,
    },
    /// Anything from the server answers the client's last flight.
    Server { answered: Arc<AtomicBool> },
}

/// One direction: reads what arrives, and writes each piece `delay` after it arrived, in order.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    side: Side,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            match &side {
                Side::Client { answered, flights } => {
                    if answered.swap(false, Ordering::SeqCst) {
                        flights.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Side::Server { answered } => answered.store(true, Ordering::SeqCst),
            }
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
        // Dropping the sender ends the writer once it has written what is queued.
    };
    tokio::join!(reader, writer);
}
