//! Limiter keys and calendar periods, shared so the control plane can read the counters the
//! data planes keep (`GET /admin/v1/consumers/{c}/usage`).
//!
//! Every key starts with the hash tag `{prefix}`: one Redis Cluster slot holds all of a
//! deployment's counters, so one script can check several limits atomically.

use crate::model::QuotaPeriod;

/// Key of a consumer's plan rate limit (a sliding window: see [`window_keys`]). Keys are
/// built with `concat` (one allocation, no formatting machinery): the data plane builds its
/// keys per request.
pub fn plan_key(prefix: &str, consumer_id: &str) -> String {
    ["{", prefix, "}:plan:", consumer_id].concat()
}

/// The two Redis keys of the sliding window named `window_key`: a sorted set of the
/// milliseconds that hold admissions (member and score: Unix ms), and a hash of admissions per
/// millisecond (field: Unix ms) with their total (field `t`). Suffixed so that data planes of
/// an earlier build (one sorted-set member per admission, under `window_key` itself) never
/// read or prune them during a rolling upgrade.
pub fn window_keys(window_key: &str) -> [String; 2] {
    [[window_key, "|ms"].concat(), [window_key, "|n"].concat()]
}

/// Admissions in the sliding window whose keys are `KEYS` ([`window_keys`]) that are later
/// than `ARGV[1]` (Unix ms): what a request at `ARGV[1]` + the window's length would count,
/// as the data planes' script does (milliseconds it has not pruned yet are subtracted, at most
/// 8000 of them, so that the read stays short). Read-only.
pub const WINDOW_COUNT_SCRIPT: &str = r"
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if newest[2] == nil or tonumber(newest[2]) <= tonumber(ARGV[1]) then
  return 0
end
local used = tonumber(redis.call('HGET', KEYS[2], 't') or '0')
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 8000)
for i = 1, #gone, 1000 do
  local counts = redis.call('HMGET', KEYS[2], unpack(gone, i, math.min(i + 999, #gone)))
  for _, c in ipairs(counts) do
    used = used - tonumber(c or '0')
  end
end
if used < 0 then
  used = 0
end
return used
";

/// Key of a consumer's quota counter for the period named by `stamp`.
pub fn quota_key(prefix: &str, consumer_id: &str, stamp: &str) -> String {
    ["{", prefix, "}:quota:", consumer_id, ":", stamp].concat()
}

/// Key of a route's own rate limit; `scope` is empty (whole route), `ip:<addr>` or `c:<id>`.
pub fn route_key(prefix: &str, route_id: &str, scope: &str) -> String {
    if scope.is_empty() {
        ["{", prefix, "}:route:", route_id].concat()
    } else {
        ["{", prefix, "}:route:", route_id, ":", scope].concat()
    }
}

/// End of the calendar period holding `now_ms`, in Unix ms, and a stamp naming the period.
pub fn period_end(period: QuotaPeriod, now_ms: i64) -> (i64, String) {
    let days = now_ms.div_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    match period {
        QuotaPeriod::Day => (
            (days + 1) * 86_400_000,
            format!("{year:04}{month:02}{day:02}"),
        ),
        QuotaPeriod::Month => {
            let (next_year, next_month) = if month == 12 {
                (year + 1, 1)
            } else {
                (year, month + 1)
            };
            (
                days_from_civil(next_year, next_month, 1) * 86_400_000,
                format!("{year:04}{month:02}"),
            )
        }
    }
}

// Howard Hinnant's civil-date algorithms (proleptic Gregorian, UTC).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_end_on_utc_calendar_boundaries() {
        // 2026-11-28T15:00:00Z
        let now = 1_795_878_000_000;
        assert_eq!(
            period_end(QuotaPeriod::Day, now),
            (1_795_910_400_000, "20261128".into())
        );
        assert_eq!(
            period_end(QuotaPeriod::Month, now),
            (1_796_083_200_000, "202611".into())
        );
        // December rolls over into January.
        let december = 1_797_000_000_000; // 2026-12-11
        assert_eq!(period_end(QuotaPeriod::Month, december).1, "202612");
        assert_eq!(
            period_end(QuotaPeriod::Month, december).0,
            1_798_761_600_000
        ); // 2027-01-01
    }

    #[test]
    fn keys_share_one_hash_tag() {
        assert_eq!(plan_key("tg", "c1"), "{tg}:plan:c1");
        assert_eq!(quota_key("tg", "c1", "20261128"), "{tg}:quota:c1:20261128");
        assert_eq!(route_key("tg", "r1", ""), "{tg}:route:r1");
        assert_eq!(
            route_key("tg", "r1", "ip:10.0.0.1"),
            "{tg}:route:r1:ip:10.0.0.1"
        );
    }
}
