//! Reading the relay's `/metrics` text: counters, gauges and the latency histogram.

/// `outbox_relay_events_published_total`, summed over topics.
pub fn published(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix("outbox_relay_events_published_total")
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A histogram's `_sum` and `_count` (for the latency histogram).
pub fn histogram_sum_count(metrics: &str) -> (f64, f64) {
    let name = "outbox_relay_end_to_end_latency_seconds";
    (
        gauge(metrics, &format!("{name}_sum")).unwrap_or(0.0),
        gauge(metrics, &format!("{name}_count")).unwrap_or(0.0),
    )
}

/// The value of an unlabelled sample.
pub fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A histogram's cumulative buckets `(le, count)`, in order, `+Inf` last.
pub fn histogram(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let le = rest.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `q` quantile of cumulative buckets, interpolated linearly within the bucket like
/// Prometheus' `histogram_quantile` (the `+Inf` bucket yields the highest finite bound).
pub fn bucket_quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower;
            }
            if count <= below {
                return le;
            }
            return lower + (le - lower) * (rank - below) / (count - below);
        }
        lower = le;
        below = count;
    }
    lower
}
