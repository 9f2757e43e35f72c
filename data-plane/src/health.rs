//! Active health checks: one task per upstream that has `health_check`, probing each target
//! with `GET <path>` every `interval_seconds`. A target is taken out of rotation after
//! `unhealthy_threshold` failed probes in a row (an error, a timeout, or a status other than
//! 2xx/3xx) and put back after `healthy_threshold` good ones. The task ends when its pool is
//! replaced by a newer snapshot.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::config::{Compiled, TargetRt, UpstreamPool};
use crate::upstream::{self, RequestHead};

/// Starts the checks of every upstream of `compiled` that has them.
pub fn watch(compiled: &Compiled) {
    for pool in &compiled.upstreams {
        if pool.health_check.is_some() {
            tokio::spawn(check_forever(Arc::downgrade(pool)));
        }
    }
}

async fn check_forever(pool: std::sync::Weak<UpstreamPool>) {
    // Consecutive (successes, failures) per target.
    let mut streaks: Vec<(i64, i64)> = Vec::new();
    loop {
        let Some(current) = pool.upgrade() else {
            return;
        };
        let Some(check) = current.health_check.clone() else {
            return;
        };
        streaks.resize(current.targets.len(), (0, 0));
        for (target, streak) in current.targets.iter().zip(streaks.iter_mut()) {
            let healthy = probe(&current, target, &check).await;
            *streak = if healthy {
                (streak.0 + 1, 0)
            } else {
                (0, streak.1 + 1)
            };
            let was = target.healthy.load(Ordering::Relaxed);
            if was && streak.1 >= check.unhealthy_threshold {
                tracing::warn!(upstream = %current.name, target = %target.authority, "target unhealthy; out of rotation");
                target.healthy.store(false, Ordering::Relaxed);
            } else if !was && streak.0 >= check.healthy_threshold {
                tracing::info!(upstream = %current.name, target = %target.authority, "target healthy again");
                target.healthy.store(true, Ordering::Relaxed);
            }
        }
        let interval = Duration::from_secs(u64::try_from(check.interval_seconds).unwrap_or(10));
        drop(current);
        tokio::time::sleep(interval).await;
    }
}

async fn probe(
    pool: &UpstreamPool,
    target: &TargetRt,
    check: &tollgate_shared::HealthCheck,
) -> bool {
    let head = RequestHead {
        method: &http::Method::GET,
        base: &target.base_path,
        path: &check.path,
        query: None,
        host: &target.host_header,
        headers: &http::HeaderMap::new(),
        added: &[],
        raw_answer: None,
        read_timeout: Duration::from_millis(u64::try_from(check.timeout_ms).unwrap_or(1_000)),
    };
    let timeout = head.read_timeout;
    let sent = upstream::send(&target.conns, pool.connect_timeout, &head, None);
    match tokio::time::timeout(timeout, sent).await {
        Ok(Ok(response)) => response.status().is_success() || response.status().is_redirection(),
        _ => false,
    }
}
