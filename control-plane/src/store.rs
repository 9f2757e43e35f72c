//! The config store: the only module with SQL. PostgreSQL in production, SQLite embedded.
//!
//! **Every write is one transaction whose first statement bumps the global revision.** That
//! row lock serializes writers on both backends, so the checks made inside the transaction
//! (name taken, referenced resource missing, resource still referenced) cannot race, a failed
//! write rolls the bump back with everything else, and a successful write bumps exactly once.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, Row, Transaction};
use tokio::sync::Notify;
use tollgate_shared::{
    ApiKeyDigest, ApiKeyEntry, Consumer, DeclarativeConfig, JwtIssuer, Plan, Reference,
    ResourceKind, Route, Snapshot, Stored, Upstream, Validate, ValidationErrors,
    validate::Collector,
};

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// PostgreSQL: the production store, shared by control-plane replicas.
    Postgres,
    /// SQLite file in the data dir: the embedded single-node default.
    Sqlite,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Nothing of that kind has that id or name.
    #[error("{kind} '{key}' not found")]
    NotFound {
        /// e.g. `upstream`
        kind: &'static str,
        /// the id or name asked for
        key: String,
    },
    /// The write clashes with existing state (name taken, still referenced).
    #[error("{0}")]
    Conflict(String),
    /// The resource is invalid, or names resources that do not exist.
    #[error("{0}")]
    Invalid(ValidationErrors),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored document could not be read back.
    #[error("stored {kind} '{id}' is unreadable: {source}")]
    Corrupt {
        /// kind of the document
        kind: &'static str,
        /// its id
        id: String,
        /// the decoding error
        source: serde_json::Error,
    },
}

/// A configuration resource the store keeps as a JSON document.
pub trait Resource:
    Validate + Serialize + DeserializeOwned + Clone + Send + Sync + Unpin + 'static
{
    /// Its kind.
    const KIND: ResourceKind;
    /// Its unique name.
    fn name(&self) -> &str;
    /// The resources it names.
    fn references(&self) -> Vec<Reference> {
        Vec::new()
    }
    /// The resource as the admin API shows it (write-only secrets removed).
    fn public_view(self) -> Self {
        self
    }
}

impl Resource for Upstream {
    const KIND: ResourceKind = ResourceKind::Upstream;
    fn name(&self) -> &str {
        &self.name
    }
}

impl Resource for Route {
    const KIND: ResourceKind = ResourceKind::Route;
    fn name(&self) -> &str {
        &self.name
    }
    fn references(&self) -> Vec<Reference> {
        Route::references(self)
    }
}

impl Resource for Consumer {
    const KIND: ResourceKind = ResourceKind::Consumer;
    fn name(&self) -> &str {
        &self.username
    }
    fn references(&self) -> Vec<Reference> {
        Consumer::references(self)
    }
}

impl Resource for Plan {
    const KIND: ResourceKind = ResourceKind::Plan;
    fn name(&self) -> &str {
        &self.name
    }
}

impl Resource for JwtIssuer {
    const KIND: ResourceKind = ResourceKind::JwtIssuer;
    fn name(&self) -> &str {
        &self.name
    }
    fn public_view(self) -> Self {
        self.redacted()
    }
}

/// An API key as stored: digest and metadata, never the secret.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyRecord {
    /// Key id.
    pub id: String,
    /// Owning consumer's id.
    pub consumer_id: String,
    /// SHA-256 of the secret.
    pub digest: ApiKeyDigest,
    /// First characters of the secret, for recognising it.
    pub prefix: String,
    /// Optional label.
    pub name: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub expires_at: Option<i64>,
    /// Unix milliseconds.
    pub revoked_at: Option<i64>,
    /// Unix milliseconds.
    pub last_used_at: Option<i64>,
}

/// Handle to the config database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    committed: Arc<Notify>,
}

/// Postgres channel on which every committed write is announced to every replica.
pub const CHANGE_CHANNEL: &str = "tollgate_config";

/// A data plane's sync state as recorded by the control plane it is connected to.
#[derive(Debug, Clone, PartialEq)]
pub struct DataPlaneRecord {
    /// Node id.
    pub node_id: String,
    /// Host name it reported.
    pub hostname: String,
    /// Its Tollgate version.
    pub version: String,
    /// Revision it last acknowledged.
    pub applied_revision: Option<i64>,
    /// Hash of that snapshot.
    pub applied_hash: Option<String>,
    /// `connected`, `synced`, `nacked`, `disconnected` or `refused`.
    pub state: String,
    /// The last nack reason, until a later ack.
    pub error: Option<String>,
    /// Unix milliseconds of the last message.
    pub last_seen: i64,
    /// Unix milliseconds of the current connection's start.
    pub connected_at: i64,
    /// Id of the control-plane replica it is connected to.
    pub control_plane: String,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Unix milliseconds as RFC 3339 UTC.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl Store {
    /// Connects to `url` (`postgres://…` or `sqlite://…`), creating an SQLite file if needed.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::Database(sqlx::Error::Configuration(
                "database URL must start with postgres:// or sqlite:".into(),
            )));
        };
        let options = AnyConnectOptions::from_str(url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Postgres => 10,
                Backend::Sqlite => 4,
            })
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        if backend == Backend::Sqlite {
            // WAL lets readers proceed while a writer holds the lock; it sticks to the file.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        Ok(Self {
            pool,
            backend,
            committed: Arc::new(Notify::new()),
        })
    }

    /// Woken after every committed config write of this process.
    pub fn committed(&self) -> Arc<Notify> {
        self.committed.clone()
    }

    /// Commits a write transaction and announces it (to this process, and through
    /// `NOTIFY` to every replica on Postgres; the notification is delivered on commit).
    async fn commit(&self, mut tx: Tx, revision: i64) -> Result<(), StoreError> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANGE_CHANNEL)
                .bind(revision.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.committed.notify_one();
        Ok(())
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies pending migrations (safe to run from several replicas at once on Postgres).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Database(e.into()))
    }

    /// Round trip to the database.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The current global config revision.
    pub async fn revision(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT revision FROM config_revision WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("revision")?)
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ------------------------------------------------------------ resources

    /// All resources of one kind, by name.
    pub async fn list<R: Resource>(&self) -> Result<Vec<Stored<R>>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, body, created_at, updated_at, revision FROM objects WHERE kind = $1 ORDER BY name",
        )
        .bind(R::KIND.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode).collect()
    }

    /// One resource by id or name.
    pub async fn get<R: Resource>(&self, key: &str) -> Result<Stored<R>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        fetch::<R>(&mut conn, key)
            .await?
            .ok_or_else(|| not_found::<R>(key))
    }

    /// Creates a resource.
    pub async fn create<R: Resource>(&self, spec: R) -> Result<Stored<R>, StoreError> {
        spec.validate().map_err(StoreError::Invalid)?;
        let mut tx = self.pool.begin().await?;
        let revision = bump(&mut tx).await?;
        if fetch_by_name::<R>(&mut tx, spec.name()).await?.is_some() {
            return Err(StoreError::Conflict(format!(
                "{} '{}' already exists",
                R::KIND.label(),
                spec.name()
            )));
        }
        check_references(&mut tx, &spec).await?;
        let now = now_ms();
        let id = uuid::Uuid::now_v7().to_string();
        sqlx::query(
            "INSERT INTO objects (kind, id, name, body, created_at, updated_at, revision) \
             VALUES ($1, $2, $3, $4, $5, $5, $6)",
        )
        .bind(R::KIND.as_str())
        .bind(&id)
        .bind(spec.name())
        .bind(encode(&spec))
        .bind(now)
        .bind(revision)
        .execute(&mut *tx)
        .await
        .map_err(unique_to_conflict)?;
        record_change(&mut tx, revision, "create", R::KIND, &id, spec.name()).await?;
        self.commit(tx, revision).await?;
        Ok(Stored {
            id,
            created_at: rfc3339(now),
            updated_at: rfc3339(now),
            revision,
            spec,
        })
    }

    /// Replaces a resource with `spec` (or, with `merge`, with `spec` computed from the current
    /// one inside the transaction, so a patch never works on stale data).
    pub async fn update<R: Resource>(
        &self,
        key: &str,
        change: impl FnOnce(R) -> Result<R, StoreError>,
    ) -> Result<Stored<R>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let revision = bump(&mut tx).await?;
        let current = fetch::<R>(&mut tx, key)
            .await?
            .ok_or_else(|| not_found::<R>(key))?;
        let spec = change(current.spec.clone())?;
        spec.validate().map_err(StoreError::Invalid)?;
        if spec.name() != current.spec.name() {
            if fetch_by_name::<R>(&mut tx, spec.name()).await?.is_some() {
                return Err(StoreError::Conflict(format!(
                    "{} '{}' already exists",
                    R::KIND.label(),
                    spec.name()
                )));
            }
            refuse_if_referenced(&mut tx, R::KIND, current.spec.name(), "renamed").await?;
        }
        check_references(&mut tx, &spec).await?;
        let now = now_ms();
        sqlx::query(
            "UPDATE objects SET name = $1, body = $2, updated_at = $3, revision = $4 \
             WHERE kind = $5 AND id = $6",
        )
        .bind(spec.name())
        .bind(encode(&spec))
        .bind(now)
        .bind(revision)
        .bind(R::KIND.as_str())
        .bind(&current.id)
        .execute(&mut *tx)
        .await
        .map_err(unique_to_conflict)?;
        record_change(
            &mut tx,
            revision,
            "update",
            R::KIND,
            &current.id,
            spec.name(),
        )
        .await?;
        self.commit(tx, revision).await?;
        Ok(Stored {
            updated_at: rfc3339(now),
            revision,
            spec,
            ..current
        })
    }

    /// Deletes a resource no other resource refers to (a consumer's keys go with it).
    pub async fn delete<R: Resource>(&self, key: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let revision = bump(&mut tx).await?;
        let current = fetch::<R>(&mut tx, key)
            .await?
            .ok_or_else(|| not_found::<R>(key))?;
        refuse_if_referenced(&mut tx, R::KIND, current.spec.name(), "deleted").await?;
        sqlx::query("DELETE FROM objects WHERE kind = $1 AND id = $2")
            .bind(R::KIND.as_str())
            .bind(&current.id)
            .execute(&mut *tx)
            .await?;
        if R::KIND == ResourceKind::Consumer {
            sqlx::query("DELETE FROM api_keys WHERE consumer_id = $1")
                .bind(&current.id)
                .execute(&mut *tx)
                .await?;
        }
        record_change(
            &mut tx,
            revision,
            "delete",
            R::KIND,
            &current.id,
            current.spec.name(),
        )
        .await?;
        self.commit(tx, revision).await?;
        Ok(())
    }

    // ------------------------------------------------------------ declarative config

    /// The whole configuration as one document (HMAC secrets left out).
    pub async fn export(&self) -> Result<DeclarativeConfig, StoreError> {
        let snapshot = self.snapshot().await?;
        Ok(DeclarativeConfig {
            upstreams: snapshot.upstreams.into_iter().map(|s| s.spec).collect(),
            routes: snapshot.routes.into_iter().map(|s| s.spec).collect(),
            consumers: snapshot.consumers.into_iter().map(|s| s.spec).collect(),
            plans: snapshot.plans.into_iter().map(|s| s.spec).collect(),
            jwt_issuers: snapshot
                .jwt_issuers
                .into_iter()
                .map(|s| s.spec.redacted())
                .collect(),
        })
    }

    /// Makes the stored configuration equal to `desired` in one transaction and one revision:
    /// resources it does not name are deleted (a consumer's keys with it). Validation covers the
    /// whole document, references included, with paths such as `routes[3].upstream`. With
    /// `dry_run`, or when nothing differs, nothing is written and the revision stays.
    pub async fn apply(
        &self,
        mut desired: DeclarativeConfig,
        dry_run: bool,
    ) -> Result<ConfigDiff, StoreError> {
        let mut tx = self.pool.begin().await?;
        let revision = bump(&mut tx).await?;
        let current_issuers = list_in::<JwtIssuer>(&mut tx).await?;
        // An issuer applied without its secret (as exported) keeps the stored one.
        for issuer in &mut desired.jwt_issuers {
            let no_key = issuer.secret.is_none()
                && issuer.public_key_pem.is_none()
                && issuer.jwks_url.is_none();
            if no_key
                && let Some(stored) = current_issuers.iter().find(|s| s.spec.name == issuer.name)
            {
                issuer.secret.clone_from(&stored.spec.secret);
            }
        }
        fn placeholder<T>(spec: T) -> Stored<T> {
            Stored {
                id: String::new(),
                created_at: String::new(),
                updated_at: String::new(),
                revision: 0,
                spec,
            }
        }
        let candidate = Snapshot {
            revision,
            upstreams: desired.upstreams.iter().cloned().map(placeholder).collect(),
            routes: desired.routes.iter().cloned().map(placeholder).collect(),
            consumers: desired.consumers.iter().cloned().map(placeholder).collect(),
            plans: desired.plans.iter().cloned().map(placeholder).collect(),
            jwt_issuers: desired
                .jwt_issuers
                .iter()
                .cloned()
                .map(placeholder)
                .collect(),
            api_keys: Vec::new(),
        };
        candidate.check().map_err(StoreError::Invalid)?;

        let mut diff = ConfigDiff::default();
        let mut writes = Vec::new();
        plan_kind(&mut tx, &desired.upstreams, &mut diff, &mut writes).await?;
        plan_kind(&mut tx, &desired.routes, &mut diff, &mut writes).await?;
        plan_kind(&mut tx, &desired.consumers, &mut diff, &mut writes).await?;
        plan_kind(&mut tx, &desired.plans, &mut diff, &mut writes).await?;
        plan_kind(&mut tx, &desired.jwt_issuers, &mut diff, &mut writes).await?;
        if dry_run || writes.is_empty() {
            tx.rollback().await?;
            diff.revision = self.revision().await?;
            return Ok(diff);
        }
        let now = now_ms();
        for write in &writes {
            match write {
                Write::Delete { kind, id } => {
                    sqlx::query("DELETE FROM objects WHERE kind = $1 AND id = $2")
                        .bind(kind.as_str())
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    if *kind == ResourceKind::Consumer {
                        sqlx::query("DELETE FROM api_keys WHERE consumer_id = $1")
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                Write::Update {
                    kind,
                    id,
                    name,
                    body,
                } => {
                    sqlx::query(
                        "UPDATE objects SET name = $1, body = $2, updated_at = $3, revision = $4 \
                         WHERE kind = $5 AND id = $6",
                    )
                    .bind(name)
                    .bind(body)
                    .bind(now)
                    .bind(revision)
                    .bind(kind.as_str())
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
                Write::Create { kind, name, body } => {
                    sqlx::query(
                        "INSERT INTO objects (kind, id, name, body, created_at, updated_at, revision) \
                         VALUES ($1, $2, $3, $4, $5, $5, $6)",
                    )
                    .bind(kind.as_str())
                    .bind(uuid::Uuid::now_v7().to_string())
                    .bind(name)
                    .bind(body)
                    .bind(now)
                    .bind(revision)
                    .execute(&mut *tx)
                    .await
                    .map_err(unique_to_conflict)?;
                }
            }
        }
        let summary = format!(
            "{} created, {} updated, {} deleted",
            diff.created.len(),
            diff.updated.len(),
            diff.deleted.len()
        );
        sqlx::query(
            "INSERT INTO changes (revision, at, action, kind, object_id, name) VALUES ($1, $2, 'apply', 'config', '', $3)",
        )
        .bind(revision)
        .bind(now)
        .bind(summary)
        .execute(&mut *tx)
        .await?;
        self.commit(tx, revision).await?;
        diff.revision = revision;
        Ok(diff)
    }

    // ------------------------------------------------------------ API keys

    /// Stores a new key for consumer `consumer_key` (id or username).
    pub async fn create_key(
        &self,
        consumer_key: &str,
        digest: &ApiKeyDigest,
        prefix: &str,
        name: Option<&str>,
        expires_at: Option<i64>,
    ) -> Result<(Stored<Consumer>, ApiKeyRecord), StoreError> {
        let mut tx = self.pool.begin().await?;
        let revision = bump(&mut tx).await?;
        let consumer = fetch::<Consumer>(&mut tx, consumer_key)
            .await?
            .ok_or_else(|| not_found::<Consumer>(consumer_key))?;
        let record = ApiKeyRecord {
            id: uuid::Uuid::now_v7().to_string(),
            consumer_id: consumer.id.clone(),
            digest: digest.clone(),
            prefix: prefix.to_string(),
            name: name.map(str::to_string),
            created_at: now_ms(),
            expires_at,
            revoked_at: None,
            last_used_at: None,
        };
        sqlx::query(
            "INSERT INTO api_keys (id, consumer_id, digest, prefix, name, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&record.id)
        .bind(&record.consumer_id)
        .bind(record.digest.as_str())
        .bind(&record.prefix)
        .bind(record.name.clone())
        .bind(record.created_at)
        .bind(record.expires_at)
        .execute(&mut *tx)
        .await
        .map_err(unique_to_conflict)?;
        record_change(
            &mut tx,
            revision,
            "create",
            ResourceKind::Consumer,
            &record.id,
            "api_key",
        )
        .await?;
        self.commit(tx, revision).await?;
        Ok((consumer, record))
    }

    /// Every key of a consumer, revoked ones included, oldest first.
    pub async fn list_keys(&self, consumer_key: &str) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let consumer = self.get::<Consumer>(consumer_key).await?;
        let rows = sqlx::query(
            "SELECT id, consumer_id, digest, prefix, name, created_at, expires_at, revoked_at, \
             last_used_at FROM api_keys WHERE consumer_id = $1 ORDER BY created_at, id",
        )
        .bind(&consumer.id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_key).collect()
    }

    /// Records when keys were last used (reported by data planes; not a config write).
    pub async fn record_key_use(&self, uses: &[(String, i64)]) -> Result<(), StoreError> {
        for (id, at) in uses {
            sqlx::query(
                "UPDATE api_keys SET last_used_at = $1 WHERE id = $2 \
                 AND (last_used_at IS NULL OR last_used_at < $1)",
            )
            .bind(*at)
            .bind(id)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    /// Revokes a key of a consumer. Revoking a revoked key is a no-op that still succeeds.
    pub async fn revoke_key(
        &self,
        consumer_key: &str,
        key_id: &str,
    ) -> Result<ApiKeyRecord, StoreError> {
        let mut tx = self.pool.begin().await?;
        let revision = bump(&mut tx).await?;
        let consumer = fetch::<Consumer>(&mut tx, consumer_key)
            .await?
            .ok_or_else(|| not_found::<Consumer>(consumer_key))?;
        let row = sqlx::query(
            "SELECT id, consumer_id, digest, prefix, name, created_at, expires_at, revoked_at, \
             last_used_at FROM api_keys WHERE consumer_id = $1 AND id = $2",
        )
        .bind(&consumer.id)
        .bind(key_id)
        .fetch_optional(&mut *tx)
        .await?;
        let mut record = match row {
            Some(row) => decode_key(&row)?,
            None => {
                return Err(StoreError::NotFound {
                    kind: "API key",
                    key: key_id.to_string(),
                });
            }
        };
        if record.revoked_at.is_some() {
            // Nothing changes, so the revision must not move either.
            tx.rollback().await?;
            return Ok(record);
        }
        let now = now_ms();
        sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2")
            .bind(now)
            .bind(&record.id)
            .execute(&mut *tx)
            .await?;
        record_change(
            &mut tx,
            revision,
            "revoke",
            ResourceKind::Consumer,
            &record.id,
            "api_key",
        )
        .await?;
        self.commit(tx, revision).await?;
        record.revoked_at = Some(now);
        Ok(record)
    }

    // ------------------------------------------------------------ admin tokens

    /// Digests of every admin token.
    pub async fn admin_token_digests(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT digest FROM admin_tokens")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| row.try_get("digest").map_err(StoreError::from))
            .collect()
    }

    /// Stores an admin token digest unless it is already there; true when inserted.
    pub async fn add_admin_token(&self, digest: &str, name: &str) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "INSERT INTO admin_tokens (id, digest, name, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (digest) DO NOTHING",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(digest)
        .bind(name)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    // ------------------------------------------------------------ data planes

    /// Records a data plane's state (insert or update by node id). Not a config write.
    ///
    /// Only the node's latest connection writes: a record from an older one (on the replica the
    /// node left: its last heartbeat, its disconnection) leaves the newer record as it is.
    /// Connections are ordered by `connected_at`, each replica's clock: replicas' clocks would
    /// have to differ by more than the old connection's age to get the order wrong.
    pub async fn upsert_data_plane(&self, record: &DataPlaneRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO data_planes (node_id, hostname, version, applied_revision, applied_hash, \
             state, error, last_seen, connected_at, control_plane) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (node_id) DO UPDATE SET hostname = $2, version = $3, \
             applied_revision = $4, applied_hash = $5, state = $6, error = $7, last_seen = $8, \
             connected_at = $9, control_plane = $10 \
             WHERE data_planes.connected_at <= $9",
        )
        .bind(&record.node_id)
        .bind(&record.hostname)
        .bind(&record.version)
        .bind(record.applied_revision)
        .bind(record.applied_hash.clone())
        .bind(&record.state)
        .bind(record.error.clone())
        .bind(record.last_seen)
        .bind(record.connected_at)
        .bind(&record.control_plane)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Data planes connected and heard from since `since` (Unix ms).
    pub async fn count_live_data_planes(&self, since: i64) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS live FROM data_planes WHERE state NOT IN ('disconnected', 'refused') AND last_seen >= $1",
        )
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("live")?)
    }

    /// Every data plane ever seen, by node id.
    pub async fn list_data_planes(&self) -> Result<Vec<DataPlaneRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, hostname, version, applied_revision, applied_hash, state, error, \
             last_seen, connected_at, control_plane FROM data_planes ORDER BY node_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DataPlaneRecord {
                    node_id: row.try_get("node_id")?,
                    hostname: row.try_get("hostname")?,
                    version: row.try_get("version")?,
                    applied_revision: row.try_get("applied_revision")?,
                    applied_hash: row.try_get("applied_hash")?,
                    state: row.try_get("state")?,
                    error: row.try_get("error")?,
                    last_seen: row.try_get("last_seen")?,
                    connected_at: row.try_get("connected_at")?,
                    control_plane: row.try_get("control_plane")?,
                })
            })
            .collect()
    }

    // ------------------------------------------------------------ snapshot

    /// Everything a data plane needs, read in one consistent transaction.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        let revision: i64 = sqlx::query("SELECT revision FROM config_revision WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?
            .try_get("revision")?;
        let now = now_ms();
        let keys = sqlx::query(
            "SELECT id, consumer_id, digest, prefix, name, created_at, expires_at, revoked_at, \
             last_used_at FROM api_keys WHERE revoked_at IS NULL",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut snapshot = Snapshot {
            revision,
            upstreams: list_in(&mut tx).await?,
            routes: list_in(&mut tx).await?,
            consumers: list_in(&mut tx).await?,
            plans: list_in(&mut tx).await?,
            jwt_issuers: list_in(&mut tx).await?,
            api_keys: Vec::with_capacity(keys.len()),
        };
        tx.commit().await?;
        for row in &keys {
            let key = decode_key(row)?;
            if key.expires_at.is_some_and(|at| at <= now) {
                continue;
            }
            snapshot.api_keys.push(ApiKeyEntry {
                id: key.id,
                consumer_id: key.consumer_id,
                digest: key.digest,
                expires_at: key.expires_at.map(|ms| ms.div_euclid(1000)),
            });
        }
        snapshot.canonicalize();
        Ok(snapshot)
    }
}

// ---------------------------------------------------------------- transaction steps

type Tx = Transaction<'static, Any>;

/// Bumps the revision. Must be the first statement of every write transaction: it takes the
/// lock that serializes writers.
async fn bump(tx: &mut Tx) -> Result<i64, StoreError> {
    let row = sqlx::query(
        "UPDATE config_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision",
    )
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.try_get("revision")?)
}

async fn record_change(
    tx: &mut Tx,
    revision: i64,
    action: &str,
    kind: ResourceKind,
    object_id: &str,
    name: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO changes (revision, at, action, kind, object_id, name) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(revision)
    .bind(now_ms())
    .bind(action)
    .bind(kind.as_str())
    .bind(object_id)
    .bind(name)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn fetch<R: Resource>(
    conn: &mut sqlx::AnyConnection,
    key: &str,
) -> Result<Option<Stored<R>>, StoreError> {
    // An id wins over a name that happens to look like one.
    let row = sqlx::query(
        "SELECT id, body, created_at, updated_at, revision FROM objects \
         WHERE kind = $1 AND (id = $2 OR name = $2) \
         ORDER BY CASE WHEN id = $2 THEN 0 ELSE 1 END LIMIT 1",
    )
    .bind(R::KIND.as_str())
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(decode).transpose()
}

async fn fetch_by_name<R: Resource>(
    conn: &mut sqlx::AnyConnection,
    name: &str,
) -> Result<Option<String>, StoreError> {
    let row = sqlx::query("SELECT id FROM objects WHERE kind = $1 AND name = $2")
        .bind(R::KIND.as_str())
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(|r| r.try_get("id")).transpose()?)
}

async fn list_in<R: Resource>(tx: &mut Tx) -> Result<Vec<Stored<R>>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, body, created_at, updated_at, revision FROM objects WHERE kind = $1 ORDER BY name",
    )
    .bind(R::KIND.as_str())
    .fetch_all(&mut **tx)
    .await?;
    rows.iter().map(decode).collect()
}

/// 422 with a field path for every reference of `spec` that names nothing.
async fn check_references<R: Resource>(tx: &mut Tx, spec: &R) -> Result<(), StoreError> {
    let mut errors = Collector::default();
    for reference in spec.references() {
        let row = sqlx::query("SELECT id FROM objects WHERE kind = $1 AND name = $2")
            .bind(reference.kind.as_str())
            .bind(&reference.name)
            .fetch_optional(&mut **tx)
            .await?;
        if row.is_none() {
            errors.push(
                &reference.field,
                format!("unknown {} '{}'", reference.kind.label(), reference.name),
            );
        }
    }
    errors.finish().map_err(StoreError::Invalid)
}

/// 409 naming every resource that still refers to (`kind`, `name`).
async fn refuse_if_referenced(
    tx: &mut Tx,
    kind: ResourceKind,
    name: &str,
    verb: &str,
) -> Result<(), StoreError> {
    let mut referrers = Vec::new();
    // Only routes and consumers refer to other resources.
    for route in list_in::<Route>(tx).await? {
        if route
            .spec
            .references()
            .iter()
            .any(|r| r.kind == kind && r.name == name)
        {
            referrers.push(format!("route '{}'", route.spec.name));
        }
    }
    for consumer in list_in::<Consumer>(tx).await? {
        if consumer
            .spec
            .references()
            .iter()
            .any(|r| r.kind == kind && r.name == name)
        {
            referrers.push(format!("consumer '{}'", consumer.spec.username));
        }
    }
    if referrers.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Conflict(format!(
            "{} '{name}' cannot be {verb}: it is used by {}",
            kind.label(),
            referrers.join(", ")
        )))
    }
}

/// What applying a declarative config changes.
#[derive(Debug, Default, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ConfigDiff {
    /// The revision after the apply (unchanged for a dry run or when nothing differs).
    pub revision: i64,
    /// Resources created, as `kind/name`.
    pub created: Vec<String>,
    /// Resources whose definition changes.
    pub updated: Vec<String>,
    /// Resources deleted (a consumer's API keys go with it).
    pub deleted: Vec<String>,
}

enum Write {
    Create {
        kind: ResourceKind,
        name: String,
        body: String,
    },
    Update {
        kind: ResourceKind,
        id: String,
        name: String,
        body: String,
    },
    Delete {
        kind: ResourceKind,
        id: String,
    },
}

/// Compares the desired resources of one kind with the stored ones, by name.
async fn plan_kind<R: Resource>(
    tx: &mut Tx,
    desired: &[R],
    diff: &mut ConfigDiff,
    writes: &mut Vec<Write>,
) -> Result<(), StoreError> {
    let kind = R::KIND;
    let current = list_in::<R>(tx).await?;
    for spec in desired {
        let body = encode(spec);
        match current.iter().find(|c| c.spec.name() == spec.name()) {
            Some(stored) if encode(&stored.spec) == body => {}
            Some(stored) => {
                diff.updated
                    .push(format!("{}/{}", kind.as_str(), spec.name()));
                writes.push(Write::Update {
                    kind,
                    id: stored.id.clone(),
                    name: spec.name().to_string(),
                    body,
                });
            }
            None => {
                diff.created
                    .push(format!("{}/{}", kind.as_str(), spec.name()));
                writes.push(Write::Create {
                    kind,
                    name: spec.name().to_string(),
                    body,
                });
            }
        }
    }
    for stored in &current {
        if !desired.iter().any(|d| d.name() == stored.spec.name()) {
            diff.deleted
                .push(format!("{}/{}", kind.as_str(), stored.spec.name()));
            writes.push(Write::Delete {
                kind,
                id: stored.id.clone(),
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- encoding

fn encode<R: Resource>(spec: &R) -> String {
    // Config resources are plain data with string map keys: serializing cannot fail.
    serde_json::to_string(spec).unwrap_or_default()
}

fn decode<R: Resource>(row: &sqlx::any::AnyRow) -> Result<Stored<R>, StoreError> {
    let id: String = row.try_get("id")?;
    let body: String = row.try_get("body")?;
    let spec = serde_json::from_str(&body).map_err(|source| StoreError::Corrupt {
        kind: R::KIND.as_str(),
        id: id.clone(),
        source,
    })?;
    Ok(Stored {
        id,
        created_at: rfc3339(row.try_get("created_at")?),
        updated_at: rfc3339(row.try_get("updated_at")?),
        revision: row.try_get("revision")?,
        spec,
    })
}

fn decode_key(row: &sqlx::any::AnyRow) -> Result<ApiKeyRecord, StoreError> {
    let id: String = row.try_get("id")?;
    let digest: String = row.try_get("digest")?;
    let digest = ApiKeyDigest::parse(&digest).map_err(|message| StoreError::Corrupt {
        kind: "api_key",
        id: id.clone(),
        source: serde::de::Error::custom(message),
    })?;
    Ok(ApiKeyRecord {
        id,
        consumer_id: row.try_get("consumer_id")?,
        digest,
        prefix: row.try_get("prefix")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        last_used_at: row.try_get("last_used_at")?,
    })
}

fn not_found<R: Resource>(key: &str) -> StoreError {
    StoreError::NotFound {
        kind: R::KIND.label(),
        key: key.to_string(),
    }
}

/// A unique-constraint violation the pre-checks missed is still a conflict, not a 500.
fn unique_to_conflict(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(format!("already exists: {}", db.message()))
        }
        _ => StoreError::Database(error),
    }
}
