//! The control plane's settings, from flags and `TOLLGATE_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;

pub use tollgate_shared::Secret;

/// Settings of `tollgate control-plane`.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Config database: `postgres://user:pass@host/db` in production; an SQLite file in the
    /// data dir when not given.
    #[arg(long, env = "TOLLGATE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,
    /// Address of the admin API.
    #[arg(long, env = "TOLLGATE_ADMIN_LISTEN", default_value = "127.0.0.1:8001")]
    pub admin_listen: SocketAddr,
    /// Admin bearer token to accept (stored hashed). When unset and no token exists yet, one is
    /// generated at first start and printed once.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// Directory for the embedded SQLite store.
    #[arg(long, env = "TOLLGATE_DATA_DIR", default_value = "./tollgate-data")]
    pub data_dir: PathBuf,
    /// Address of the cluster listener data planes sync from.
    #[arg(
        long,
        env = "TOLLGATE_CLUSTER_LISTEN",
        default_value = "127.0.0.1:8005"
    )]
    pub cluster_listen: SocketAddr,
    /// Token data planes present to the cluster listener. Without it the cluster listener is
    /// off (the admin API still works).
    #[arg(long, env = "TOLLGATE_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<Secret>,
    /// Certificate chain (PEM, leaf first) of the cluster listener: with
    /// `TOLLGATE_CLUSTER_TLS_KEY_FILE`, data planes sync over TLS (`https://` URLs).
    #[arg(long, env = "TOLLGATE_CLUSTER_TLS_CERT_FILE")]
    pub cluster_tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of the cluster listener's certificate.
    #[arg(long, env = "TOLLGATE_CLUSTER_TLS_KEY_FILE")]
    pub cluster_tls_key_file: Option<PathBuf>,
    /// Seconds between safety-net checks for config written by other replicas (changes
    /// normally arrive at once through Postgres NOTIFY).
    #[arg(long, env = "TOLLGATE_CONFIG_POLL_SECONDS", default_value_t = 5)]
    pub config_poll_seconds: u64,
    /// The data planes' Redis, read for `GET /admin/v1/consumers/{c}/usage`.
    #[arg(long, env = "TOLLGATE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,
    /// Prefix of the limiter keys (as on the data planes).
    #[arg(long, env = "TOLLGATE_REDIS_PREFIX", default_value = "tollgate")]
    pub redis_prefix: String,
    /// A data plane silent for this many seconds counts as gone (they heartbeat every 5 s).
    #[arg(
        long,
        env = "TOLLGATE_DATA_PLANE_TIMEOUT_SECONDS",
        default_value_t = 30
    )]
    pub data_plane_timeout_seconds: u64,
}

impl Settings {
    /// The database URL to use: the configured one, or the embedded SQLite file.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.expose().to_string(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("tollgate.db").display()
            ),
        }
    }

    /// The database URL with any password replaced, for logs.
    pub fn database_url_redacted(&self) -> String {
        redact_url_password(&self.database_url())
    }

    /// Rejects settings that cannot work, with a message naming the setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        let url = self.database_url();
        if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("sqlite:"))
        {
            anyhow::bail!("TOLLGATE_DATABASE_URL must start with postgres:// or sqlite:");
        }
        if let Some(token) = &self.admin_token
            && token.expose().len() < 16
        {
            anyhow::bail!("TOLLGATE_ADMIN_TOKEN must be at least 16 characters");
        }
        if let Some(token) = &self.cluster_token
            && token.expose().len() < 16
        {
            anyhow::bail!("TOLLGATE_CLUSTER_TOKEN must be at least 16 characters");
        }
        if self.cluster_tls_cert_file.is_some() != self.cluster_tls_key_file.is_some() {
            anyhow::bail!(
                "TOLLGATE_CLUSTER_TLS_CERT_FILE and TOLLGATE_CLUSTER_TLS_KEY_FILE go together"
            );
        }
        if self.config_poll_seconds == 0 || self.data_plane_timeout_seconds == 0 {
            anyhow::bail!("poll interval and data-plane timeout must be at least 1 second");
        }
        Ok(())
    }
}

fn redact_url_password(url: &str) -> String {
    // scheme://user:password@host/... → scheme://user:<redacted>@host/...
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        for (url, want) in [
            (
                "postgres://u:pw@h:5432/db",
                "postgres://u:<redacted>@h:5432/db",
            ),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("sqlite://./x.db?mode=rwc", "sqlite://./x.db?mode=rwc"),
        ] {
            assert_eq!(redact_url_password(url), want);
        }
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "\"<redacted>\"");
    }
}
