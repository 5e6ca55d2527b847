//! Prometheus metrics of the provisioner, on its own registry (no global state, so
//! tests can build as many apps as they like).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `provisioner_http_requests_total{method,route,status}`; route is the matched
    /// pattern (`/v1/apps/{tenant_id}/{slug}/{env}`), so cardinality stays bounded.
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// `provisioner_operations_total{operation,outcome}`.
    pub operations: IntCounterVec,
}

#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "provisioner_http_requests_total",
                "HTTP requests by method, route and status.",
            ),
            &["method", "route", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "provisioner_http_request_duration_seconds",
                "HTTP request latency by method and route.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["method", "route"],
        )?;
        let operations = IntCounterVec::new(
            Opts::new(
                "provisioner_operations_total",
                "Provisioning operations by kind and outcome.",
            ),
            &["operation", "outcome"],
        )?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(operations.clone()))?;
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
        // process_max_fds, ...: what an operator checks first when the service is slow.
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics {
            registry,
            http_requests,
            http_duration,
            operations,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}
