//! `tollgate export` and `tollgate apply`: the declarative config over the admin API.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tollgate_shared::Secret;

/// Where the admin API is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminApi {
    /// Base URL of a control plane's admin API.
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:8001"
    )]
    pub admin_url: String,
    /// Admin bearer token.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Secret,
}

/// Options of `tollgate apply`.
#[derive(Debug, Clone, clap::Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub api: AdminApi,
    /// JSON document to apply (`-` reads standard input), as `tollgate export` writes it.
    pub file: String,
    /// Only show what would change.
    #[arg(long)]
    pub dry_run: bool,
}

/// Prints the whole configuration as JSON.
pub async fn export(api: &AdminApi) -> anyhow::Result<()> {
    let body = call(api, http::Method::GET, "/admin/v1/config", None).await?;
    println!("{body}");
    Ok(())
}

/// Applies a document and prints the changes.
pub async fn apply(args: &ApplyArgs) -> anyhow::Result<()> {
    let document = if args.file == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file))?
    };
    let path = if args.dry_run {
        "/admin/v1/config?dry_run=true"
    } else {
        "/admin/v1/config"
    };
    let body = call(&args.api, http::Method::PUT, path, Some(document)).await?;
    println!("{body}");
    Ok(())
}

async fn call(
    api: &AdminApi,
    method: http::Method,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = format!("{}{path}", api.admin_url.trim_end_matches('/'))
        .parse()
        .context("TOLLGATE_ADMIN_URL is not a valid URL")?;
    let request = http::Request::builder()
        .method(method)
        .uri(uri)
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", api.admin_token.expose()),
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let response = client
        .request(request)
        .await
        .with_context(|| format!("calling {}", api.admin_url))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .context("reading the answer")?
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    if !status.is_success() {
        anyhow::bail!("the admin API answered {status}: {text}");
    }
    Ok(text)
}
