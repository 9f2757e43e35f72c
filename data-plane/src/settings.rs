//! The data plane's settings, from flags and `TOLLGATE_*` environment variables.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use tollgate_shared::Secret;

/// Settings of `tollgate data-plane`.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Control plane's cluster listener.
    #[arg(
        long,
        env = "TOLLGATE_CONTROL_PLANE_URL",
        default_value = "http://127.0.0.1:8005"
    )]
    pub control_plane_url: String,
    /// More trusted roots (a PEM file: an internal CA) for an `https://` control plane URL,
    /// besides the public ones.
    #[arg(long, env = "TOLLGATE_CLUSTER_CA_FILE")]
    pub cluster_ca_file: Option<PathBuf>,
    /// Token presented to the control plane's cluster listener (required).
    #[arg(long, env = "TOLLGATE_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<Secret>,
    /// Address of the proxy listener (HTTP/1.1 and cleartext HTTP/2).
    #[arg(long, env = "TOLLGATE_PROXY_LISTEN", default_value = "0.0.0.0:8000")]
    pub proxy_listen: SocketAddr,
    /// Address of the status listener (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "TOLLGATE_STATUS_LISTEN", default_value = "127.0.0.1:8100")]
    pub status_listen: SocketAddr,
    /// Where the last good snapshot and the node id are kept.
    #[arg(long, env = "TOLLGATE_DATA_DIR", default_value = "./tollgate-data")]
    pub data_dir: PathBuf,
    /// Node id; generated once and kept in the data dir when not given.
    #[arg(long, env = "TOLLGATE_NODE_ID")]
    pub node_id: Option<String>,
    /// Proxy worker threads (default: one per core).
    #[arg(long, env = "TOLLGATE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Peers whose `X-Forwarded-*` headers are believed: comma-separated IPs or CIDRs
    /// (e.g. a load balancer's `10.0.0.0/8`). Others get theirs replaced.
    #[arg(long, env = "TOLLGATE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<Cidr>,
    /// Seconds between heartbeats to the control plane.
    #[arg(long, env = "TOLLGATE_HEARTBEAT_SECONDS", default_value_t = 5)]
    pub heartbeat_seconds: u64,
    /// Shared Redis for rate limits and quotas (`redis://host:6379/0`). Without it each node
    /// limits in its own memory (single-node semantics).
    #[arg(long, env = "TOLLGATE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,
    /// Prefix (and Redis Cluster hash tag) of every limiter key.
    #[arg(long, env = "TOLLGATE_REDIS_PREFIX", default_value = "tollgate")]
    pub redis_prefix: String,
    /// Longest wait for Redis before a limit falls back to its failure policy.
    #[arg(long, env = "TOLLGATE_REDIS_TIMEOUT_MS", default_value_t = 10)]
    pub redis_timeout_ms: u64,
    /// Whether, after a busy limiter call, the next waits for the data plane to go idle with
    /// no admitted request at its upstream: `auto` (when Redis is on this host: loopback or a
    /// Unix socket, sharing its cores), `on` or `off`. See `pacing.rs`.
    #[arg(long, env = "TOLLGATE_LIMITER_PACING", default_value = "auto")]
    pub limiter_pacing: crate::pacing::Mode,
    /// Shortest time between two JWKS fetches triggered by unknown `kid`s, per JWKS URL.
    #[arg(long, env = "TOLLGATE_JWKS_MIN_REFRESH_MS", default_value_t = 10_000)]
    pub jwks_min_refresh_ms: u64,
    /// PEM file of extra root certificates trusted for https JWKS URLs (an internal CA), on top
    /// of the bundled Mozilla roots.
    #[arg(long, env = "TOLLGATE_JWKS_CA_FILE")]
    pub jwks_ca_file: Option<PathBuf>,
    /// Largest request head (request line and headers) accepted; larger gets 431.
    #[arg(long, env = "TOLLGATE_MAX_HEADER_BYTES", default_value_t = 32 * 1024)]
    pub max_header_bytes: usize,
    /// Longest time an HTTP/1 connection may take to send a complete request head, counted
    /// from when it was accepted or its last response ended (slowloris guard; also the idle
    /// keep-alive timeout). Longer gets the connection closed.
    #[arg(long, env = "TOLLGATE_HEADER_TIMEOUT_MS", default_value_t = 30_000)]
    pub header_timeout_ms: u64,
    /// Longest a response may wait for the client to read any of it (a stalled reader holds
    /// a connection and an upstream connection); longer gets the connection closed.
    #[arg(long, env = "TOLLGATE_SEND_TIMEOUT_MS", default_value_t = 60_000)]
    pub send_timeout_ms: u64,
    /// Longest a request body may wait for the client to send more of it; longer gets an
    /// HTTP/1 connection closed, an HTTP/2 stream answered 408 `body_timeout`.
    #[arg(long, env = "TOLLGATE_BODY_TIMEOUT_MS", default_value_t = 60_000)]
    pub body_timeout_ms: u64,
}

impl Settings {
    /// Rejects settings that cannot work, naming the setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.cluster_token.is_none() {
            anyhow::bail!("TOLLGATE_CLUSTER_TOKEN is required: the control plane's cluster token");
        }
        if !(self.control_plane_url.starts_with("http://")
            || self.control_plane_url.starts_with("https://"))
        {
            anyhow::bail!("TOLLGATE_CONTROL_PLANE_URL must be an http:// or https:// URL");
        }
        if self.worker_threads == Some(0) {
            anyhow::bail!("TOLLGATE_WORKER_THREADS must be at least 1");
        }
        if self.heartbeat_seconds == 0 {
            anyhow::bail!("TOLLGATE_HEARTBEAT_SECONDS must be at least 1");
        }
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(['{', '}']) {
            anyhow::bail!("TOLLGATE_REDIS_PREFIX must be non-empty and free of braces");
        }
        if self.redis_timeout_ms == 0 {
            anyhow::bail!("TOLLGATE_REDIS_TIMEOUT_MS must be at least 1");
        }
        if self.header_timeout_ms < 100 {
            anyhow::bail!("TOLLGATE_HEADER_TIMEOUT_MS must be at least 100");
        }
        if self.send_timeout_ms < 100 {
            anyhow::bail!("TOLLGATE_SEND_TIMEOUT_MS must be at least 100");
        }
        if self.body_timeout_ms < 100 {
            anyhow::bail!("TOLLGATE_BODY_TIMEOUT_MS must be at least 100");
        }
        if self.max_header_bytes < 8192 {
            anyhow::bail!("TOLLGATE_MAX_HEADER_BYTES must be at least 8192");
        }
        Ok(())
    }
}

/// An IP network such as `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            (IpAddr::V6(_), IpAddr::V4(ip)) => self.contains(IpAddr::V6(ip.to_ipv6_mapped())),
            (IpAddr::V4(_), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(IpAddr::V4(v4))),
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let network: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{s}' is not an IP address or CIDR"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("bad prefix length in '{s}'"))?,
            None => max,
        };
        Ok(Self { network, prefix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let check = |cidr: &str, ip: &str| {
            cidr.parse::<Cidr>()
                .expect("cidr")
                .contains(ip.parse().expect("ip"))
        };
        assert!(check("10.0.0.0/8", "10.2.3.4"));
        assert!(!check("10.0.0.0/8", "11.0.0.1"));
        assert!(check("127.0.0.1", "127.0.0.1"));
        assert!(!check("127.0.0.1", "127.0.0.2"));
        assert!(check("0.0.0.0/0", "8.8.8.8"));
        assert!(check("::1", "::1"));
        assert!(check("10.0.0.0/8", "::ffff:10.1.1.1"));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
    }
}
