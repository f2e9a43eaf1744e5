//! A TCP proxy that puts a network between the engine and PostgreSQL: every byte is forwarded
//! after a fixed delay (half the round trip each way), in order, without waiting for answers, so
//! pipelined requests stay pipelined. It counts the client's *flights*: bursts the client sends
//! after the server has answered something (a round trip the client waited for), which is how
//! the tests and the benchmark count round trips without trusting the engine's own counter.
//!
//! [`LatencyProxy::cut`] drops every open connection at once, as a failing network does: the
//! engine sees an I/O error (no SQLSTATE), possibly with a COMMIT sent and its answer lost.
//!
//! Plain threads and blocking sockets, because the delay must be precise: a tokio timer rounds
//! to whole milliseconds, which turned a 1 ms round trip into 3.5 ms. A fixture of the
//! integration tests and of `cargo bench` (which includes this file by path); not part of the
//! product.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running proxy; it stops accepting when dropped (open connections run on until closed).
pub struct LatencyProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// What the proxy's threads share.
struct Shared {
    flights: AtomicU64,
    stop: AtomicBool,
    /// Both ends of every connection open now, for `cut`.
    open: Mutex<Vec<TcpStream>>,
}

impl LatencyProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`
    /// (`host:port`), delaying each direction by `rtt / 2`.
    pub fn start(upstream: &str, rtt: Duration) -> LatencyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared {
            flights: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
        });
        let (upstream, serving) = (upstream.to_string(), shared.clone());
        std::thread::Builder::new()
            .name("latency-proxy".into())
            .spawn(move || serve(listener, &upstream, rtt / 2, serving))
            .expect("the proxy's thread");
        LatencyProxy { addr, shared }
    }

    /// `host:port` to connect to instead of the server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Client flights (round trips waited for) over every connection so far.
    pub fn flights(&self) -> u64 {
        self.shared.flights.load(Ordering::SeqCst)
    }

    /// Drops every connection open now, in both directions, without a goodbye.
    pub fn cut(&self) {
        for stream in self.shared.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(listener: TcpListener, upstream: &str, delay: Duration, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let Ok(server) = TcpStream::connect(upstream) else {
            continue;
        };
        let _ = client.set_nonblocking(false);
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
            shared.open.lock().unwrap().extend([c, s]);
        }
        // Whether the server sent something since the client's last burst.
        let answered = Arc::new(AtomicBool::new(true));
        let up = Side::Client {
            answered: answered.clone(),
            shared: shared.clone(),
        };
        relay(&client, &server, delay, up);
        relay(&server, &client, delay, Side::Server { answered });
    }
}

/// Which side a direction reads from, and what it tells the flight count.
enum Side {
    /// A burst from the client after an answer is a new flight.
    Client {
        answered: Arc<AtomicBool>,
        shared: Arc<Shared>,
    },
    /// Anything from the server answers the client's last flight.
    Server { answered: Arc<AtomicBool> },
}

/// One direction, on two threads: one reads what arrives and stamps it, the other writes each
/// piece `delay` after it arrived, in order.
fn relay(from: &TcpStream, to: &TcpStream, delay: Duration, side: Side) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            match &side {
                Side::Client { answered, shared } => {
                    if answered.swap(false, Ordering::SeqCst) {
                        shared.flights.fetch_add(1, Ordering::SeqCst);
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
    });
    std::thread::spawn(move || {
        while let Ok((due, bytes)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
