//! The network between the engine and the database in the "remote database" section: the
//! latency proxy of the integration tests (`latency_proxy`, one implementation for both) put in
//! front of the benchmark's server, the URL that reaches the server through it, and the round
//! trip it really adds (`SELECT 1`, timed through it).
//!
//! Sets the proxy up and measures nothing but that round trip; the sections decide what runs
//! through it (`Route`).

use crate::latency_proxy::LatencyProxy;
use std::time::{Duration, Instant};

/// How a contender reaches the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Straight to the server (a unix socket or loopback TCP).
    Loopback,
    /// Through the latency proxy (`--rtt`).
    Proxy,
}

/// The proxy in front of the server, and how to reach the server through it.
pub struct Remote {
    pub proxy: LatencyProxy,
    /// The benchmark's database URL, with the proxy's address as host and port.
    pub url: String,
    /// The round trip the proxy adds (`--rtt`).
    pub rtt: Duration,
}

/// Starts a proxy in front of the server that `tcp_url` reaches over TCP. Err: why the
/// proxied half of the benchmark cannot run (said in the report).
pub fn remote(tcp_url: &str, rtt: Duration) -> Result<Remote, String> {
    if rtt.is_zero() {
        return Err("--rtt 0: no proxy".into());
    }
    let (upstream, rewrite) = host_port(tcp_url)?;
    let proxy = LatencyProxy::start(&upstream, rtt);
    let url = rewrite(&proxy.addr().to_string());
    Ok(Remote { proxy, url, rtt })
}

type Rewrite = Box<dyn Fn(&str) -> String>;

/// The `host:port` of a `postgresql://` URL with one TCP host, and a function that puts another
/// `host:port` in its place.
fn host_port(url: &str) -> Result<(String, Rewrite), String> {
    let bad = |why: &str| {
        Err(format!(
            "the database URL {why}, so nothing can be put in between"
        ))
    };
    let Some(scheme_end) = url.find("://") else {
        return bad("is not of the form postgresql://host:port/db");
    };
    let rest = &url[scheme_end + 3..];
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..auth_end];
    let host_start = authority.rfind('@').map(|i| i + 1).unwrap_or(0);
    let hostport = &authority[host_start..];
    if hostport.is_empty() || hostport.starts_with('%') || hostport.contains(',') {
        return bad("names no single TCP host");
    }
    if rest[auth_end..].contains("host=") {
        return bad("sets its host as a parameter");
    }
    let upstream = if hostport.contains(':') && !hostport.ends_with(']') {
        hostport.to_string()
    } else {
        format!("{hostport}:5432")
    };
    let (head, tail) = (
        url[..scheme_end + 3 + host_start].to_string(),
        url[scheme_end + 3 + auth_end..].to_string(),
    );
    Ok((upstream, Box::new(move |hp| format!("{head}{hp}{tail}"))))
}

/// The median of 21 `SELECT 1` round trips on a connection to `url`.
pub async fn measured_rtt(url: &str) -> Duration {
    let c = crate::connect(url).await;
    let mut times = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        c.simple_query("SELECT 1").await.unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

/// `1ms`, `250us`, `2ms`, `0`: a round trip for `--rtt`, in the engine's own duration syntax.
pub fn parse_rtt(s: &str) -> Duration {
    match s.trim() {
        "0" => Duration::ZERO,
        text => humantime::parse_duration(text).unwrap_or_else(|e| {
            panic!("--rtt needs a duration such as 1ms or 250us, got {s:?}: {e}")
        }),
    }
}
