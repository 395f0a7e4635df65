//! OpenTelemetry over OTLP/gRPC, on when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set and
//! `OTEL_SDK_DISABLED` is not `true`. The SDK reads the rest of the standard
//! variables itself (`OTEL_EXPORTER_OTLP_HEADERS`, `…_TIMEOUT`,
//! `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`, `OTEL_METRIC_EXPORT_INTERVAL`).
//!
//! Export runs on a thread of its own (the SDK's `TokioCurrentThread`
//! runtime), so neither a slow collector nor the flush at shutdown can stall
//! the process's request path.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::runtime::TokioCurrentThread;
use opentelemetry_sdk::trace::{BatchConfigBuilder, SdkTracer, SdkTracerProvider};

pub use opentelemetry;

/// Where and how often to export.
#[derive(Debug, Clone, Default)]
pub struct OtlpConfig {
    /// gRPC endpoint of the collector, e.g. `http://127.0.0.1:4317`.
    pub endpoint: Option<String>,
    pub service_name: String,
    /// Longest a finished span waits before it is sent (None: the SDK's
    /// `OTEL_BSP_SCHEDULE_DELAY`, default 5 s).
    pub span_delay: Option<Duration>,
    /// Metric export interval (None: `OTEL_METRIC_EXPORT_INTERVAL`, default 60 s).
    pub metric_interval: Option<Duration>,
}

impl OtlpConfig {
    /// From the standard environment variables.
    pub fn from_env(service_name: &str) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .filter(|_| !disabled);
        Self {
            endpoint,
            service_name: var("OTEL_SERVICE_NAME").unwrap_or_else(|| service_name.to_owned()),
            span_delay: None,
            metric_interval: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("OpenTelemetry exporter: {0}")]
pub struct TelemetryError(String);

/// The providers; dropping them stops export, [`Otel::shutdown`] flushes first.
#[derive(Clone)]
pub struct Otel {
    pub tracer: SdkTracer,
    pub meter: opentelemetry::metrics::Meter,
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
}

impl std::fmt::Debug for Otel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Otel")
    }
}

impl Otel {
    /// Starts the exporters when an endpoint is configured (must be called
    /// inside a Tokio runtime). `Ok(None)` when OTLP is off.
    pub fn start(config: &OtlpConfig) -> Result<Option<Self>, TelemetryError> {
        let Some(endpoint) = &config.endpoint else {
            return Ok(None);
        };
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| TelemetryError(e.to_string()))?;
        let mut batch = BatchConfigBuilder::default();
        if let Some(delay) = config.span_delay {
            batch = batch.with_scheduled_delay(delay);
        }
        let processor =
            opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                spans,
                TokioCurrentThread,
            )
            .with_batch_config(batch.build())
            .build();
        let tracer_provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource.clone())
            .build();

        let metrics = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| TelemetryError(e.to_string()))?;
        let mut reader =
            opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader::builder(
                metrics,
                TokioCurrentThread,
            );
        if let Some(every) = config.metric_interval {
            reader = reader.with_interval(every);
        }
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(reader.build())
            .with_resource(resource)
            .build();
        let scope = opentelemetry::InstrumentationScope::builder(config.service_name.clone())
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        tracing::info!(%endpoint, service = %config.service_name, "exporting OpenTelemetry traces and metrics over OTLP");
        Ok(Some(Self {
            tracer: tracer_provider.tracer_with_scope(scope.clone()),
            meter: opentelemetry::metrics::MeterProvider::meter_with_scope(&meter_provider, scope),
            tracer_provider,
            meter_provider,
        }))
    }

    /// Exports what is buffered and stops (off the async threads: the SDK
    /// blocks while it flushes).
    pub async fn shutdown(self) {
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = self.tracer_provider.shutdown() {
                tracing::debug!(error = %e, "trace exporter shutdown");
            }
            if let Err(e) = self.meter_provider.shutdown() {
                tracing::debug!(error = %e, "metric exporter shutdown");
            }
        })
        .await;
    }
}

/// W3C trace context in HTTP headers.
pub mod propagation {
    use http::{HeaderMap, HeaderName, HeaderValue};
    use opentelemetry::Context;
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    struct Headers<'a>(&'a HeaderMap);

    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(HeaderName::as_str).collect()
        }
    }

    struct HeadersMut<'a>(&'a mut HeaderMap);

    impl Injector for HeadersMut<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(key.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                self.0.insert(k, v);
            }
        }
    }

    static PROPAGATOR: std::sync::LazyLock<TraceContextPropagator> =
        std::sync::LazyLock::new(TraceContextPropagator::new);

    /// The caller's trace context (`traceparent`, `tracestate`), if any.
    pub fn extract(headers: &HeaderMap) -> Context {
        PROPAGATOR.extract(&Headers(headers))
    }

    /// Writes `cx` as `traceparent`/`tracestate`, replacing the caller's.
    pub fn inject(cx: &Context, headers: &mut HeaderMap) {
        PROPAGATOR.inject_context(cx, &mut HeadersMut(headers));
    }
}
