//! The HTTP service on the library: the seed's endpoints, each also taking `as_of`.
//!
//! | endpoint | report |
//! |---|---|
//! | `GET /health` | liveness and what the warehouse covers |
//! | `GET /metrics` | the metrics acme records ([`acme_core::telemetry`]), in Prometheus text, once [`prometheus`] installed the recorder (404 before) |
//! | `GET /ready` | 200 when the reports can be served fresh, 503 (with the reason) while there is no model yet, the pipeline stopped, or its lag exceeds the bound ([`ServiceState::max_lag`]) |
//! | `GET /analytics/orders?status=open&as_of=` | R1 orders by delivery date and status |
//! | `GET /analytics/orders/top?limit=3&as_of=` | R2 top delivery dates by open orders |
//! | `GET /analytics/orders/product?as_of=` | R3 items of open orders by product |
//! | `GET /analytics/orders/customers?status=pending&limit=3&as_of=` | R4 top customers |
//!
//! Bad parameters answer 400 with `{"error": "..."}`; `as_of` is RFC 3339.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio::sync::watch;

use crate::PipelineStatus;
use crate::query::{QueryError, StatusFilter, Warehouse};

/// The lag beyond which `GET /ready` answers 503 unless set with [`ServiceState::max_lag`].
pub const DEFAULT_MAX_READY_LAG: Duration = Duration::from_secs(30);

/// The warehouse the service answers from: a fixed handle (swapped with
/// [`ServiceState::replace`]) or the handles a running [`crate::Pipeline`] publishes.
#[derive(Clone, Debug)]
pub struct ServiceState {
    warehouse: watch::Receiver<Arc<Warehouse>>,
    replace: Option<Arc<watch::Sender<Arc<Warehouse>>>>,
    status: Option<watch::Receiver<PipelineStatus>>,
    max_lag: Duration,
    metrics: Option<PrometheusHandle>,
}

/// Install the process-wide Prometheus recorder that `GET /metrics` renders (once; later calls
/// return the same handle), and describe acme's metrics in it. Fails when the process installed
/// another [`metrics`] recorder first: render that one instead.
pub fn prometheus() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    // Histograms as Prometheus histograms (buckets add up across instances; quantiles do not).
    let buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)?
        .install_recorder()?;
    acme_core::telemetry::describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

impl ServiceState {
    /// Serve `warehouse`.
    pub fn new(warehouse: Warehouse) -> Self {
        let (sender, warehouse) = watch::channel(Arc::new(warehouse));
        Self { warehouse, replace: Some(Arc::new(sender)), status: None, max_lag: DEFAULT_MAX_READY_LAG, metrics: None }
    }

    /// Serve `warehouse` while another process writes it (for example `sync`): every `every`,
    /// the served handle is refreshed ([`Warehouse::refreshed`], which reads only the new
    /// commits and keeps what the caller registered), and requests move to the new handle;
    /// a failed refresh is logged and retried at the next tick, the old handle still served.
    /// The refreshing task ends when the last clone of the state is dropped. Needs a tokio
    /// runtime.
    pub fn following(warehouse: Warehouse, every: Duration) -> Self {
        let state = Self::new(warehouse);
        let (mut current, sender) = (state.warehouse.clone(), state.replace.clone());
        let Some(sender) = sender.map(|s| Arc::downgrade(&s)) else { return state };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Only while a state still serves from this handle chain.
                let Some(sender) = sender.upgrade() else { break };
                let handle = Arc::clone(&*current.borrow_and_update());
                match handle.refreshed().await {
                    Ok(Some(newer)) => {
                        sender.send_replace(Arc::new(newer));
                    }
                    Ok(None) => {}
                    Err(error) => tracing::warn!(%error, "refreshing the served warehouse failed; retrying"),
                }
            }
        });
        state
    }

    /// Serve the newest handle of a running pipeline ([`crate::Pipeline::warehouses`]): each
    /// request answers from the newest consistent state.
    pub fn live(warehouses: watch::Receiver<Arc<Warehouse>>) -> Self {
        Self { warehouse: warehouses, replace: None, status: None, max_lag: DEFAULT_MAX_READY_LAG, metrics: None }
    }

    /// Serve a running pipeline: its newest handles, and its status for `GET /ready`.
    pub fn pipeline(pipeline: &crate::Pipeline) -> Self {
        Self { status: Some(pipeline.status()), ..Self::live(pipeline.warehouses()) }
    }

    /// `GET /ready` answers 503 while the pipeline's lag ([`PipelineStatus::lag_seconds`])
    /// exceeds `lag` (default [`DEFAULT_MAX_READY_LAG`]).
    pub fn max_lag(mut self, lag: Duration) -> Self {
        self.max_lag = lag;
        self
    }

    /// Serve the metrics `handle` renders at `GET /metrics` (see [`prometheus`]).
    pub fn metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Swap in a newer warehouse view (queries in flight finish on the old one). A live state
    /// follows its pipeline instead and ignores this.
    pub async fn replace(&self, warehouse: Warehouse) {
        if let Some(sender) = &self.replace {
            sender.send_replace(Arc::new(warehouse));
        }
    }

    /// The handle requests answer from now.
    pub async fn warehouse(&self) -> Arc<Warehouse> {
        self.current().await
    }

    async fn current(&self) -> Arc<Warehouse> {
        Arc::clone(&*self.warehouse.borrow())
    }
}

/// The service's routes.
pub fn router(state: ServiceState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .route("/analytics/orders", get(open_orders))
        .route("/analytics/orders/top", get(top_dates))
        .route("/analytics/orders/product", get(items_by_product))
        .route("/analytics/orders/customers", get(top_customers))
        .with_state(state)
}

/// An error answered as JSON.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::InvalidParameter { .. } | QueryError::BeforeHistory { .. } => {
                ApiError(StatusCode::BAD_REQUEST, e.to_string())
            }
            other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type Params = Query<HashMap<String, String>>;

fn bad(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message)
}

fn as_of(params: &HashMap<String, String>) -> Result<Option<DateTime<Utc>>, ApiError> {
    params
        .get("as_of")
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| bad(format!("invalid parameter `as_of`: `{v}` is not an RFC 3339 instant ({e})")))
        })
        .transpose()
}

fn limit(params: &HashMap<String, String>) -> Result<usize, ApiError> {
    match params.get("limit") {
        None => Ok(3),
        Some(v) => v.parse().map_err(|_| bad(format!("invalid parameter `limit`: `{v}` is not a positive integer"))),
    }
}

fn status(params: &HashMap<String, String>, default: StatusFilter) -> Result<StatusFilter, ApiError> {
    match params.get("status") {
        None => Ok(default),
        Some(v) => Ok(StatusFilter::parse(v)?),
    }
}

async fn render_metrics(State(state): State<ServiceState>) -> Response {
    match &state.metrics {
        Some(handle) => {
            handle.run_upkeep();
            ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
        }
        None => ApiError(
            StatusCode::NOT_FOUND,
            "no metrics recorder: serve one with ServiceState::metrics(acme::http::prometheus()?)".into(),
        )
        .into_response(),
    }
}

async fn health(State(state): State<ServiceState>) -> Json<serde_json::Value> {
    let w = state.current().await;
    Json(json!({
        "status": "ok",
        "history_start": w.history_start(),
        "raw_position": w.raw_position().map(|p| p.0),
        "model_position": w.model_position().map(|p| p.0),
    }))
}

/// Why the service is not ready (`None`: ready), for `GET /ready`: no model yet, the pipeline
/// stopped, or its lag beyond `max_lag`.
fn not_ready(has_model: bool, status: Option<&PipelineStatus>, max_lag: Duration) -> Option<String> {
    if !has_model {
        return Some("no model yet: the snapshot or the first model build is still running".to_string());
    }
    let status = status?;
    if !status.running {
        return Some(format!("the pipeline stopped: {}", status.last_error.as_deref().unwrap_or("shut down")));
    }
    let lag = status.lag_seconds.filter(|lag| *lag > max_lag.as_secs_f64())?;
    Some(format!("lag {lag:.1}s exceeds the bound of {:.1}s", max_lag.as_secs_f64()))
}

async fn ready(State(state): State<ServiceState>) -> Response {
    let w = state.current().await;
    let status = state.status.as_ref().map(|s| s.borrow().clone());
    let reason = not_ready(w.model_position().is_some(), status.as_ref(), state.max_lag);
    let body = json!({
        "ready": reason.is_none(),
        "reason": reason,
        "raw_position": w.raw_position().map(|p| p.0),
        "model_position": w.model_position().map(|p| p.0),
        "lag_seconds": status.as_ref().and_then(|s| s.lag_seconds),
        "lag_bytes": status.as_ref().and_then(|s| s.lag_bytes),
        "max_lag_seconds": state.max_lag.as_secs_f64(),
    });
    let code = if reason.is_none() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body)).into_response()
}

async fn open_orders(State(state): State<ServiceState>, Query(p): Params) -> Result<Response, ApiError> {
    let filter = status(&p, StatusFilter::Open)?;
    let rows = state.current().await.open_orders(filter, as_of(&p)?).await?;
    Ok(Json(rows).into_response())
}

async fn top_dates(State(state): State<ServiceState>, Query(p): Params) -> Result<Response, ApiError> {
    let rows = state.current().await.top_delivery_dates(limit(&p)?, as_of(&p)?).await?;
    Ok(Json(rows).into_response())
}

async fn items_by_product(State(state): State<ServiceState>, Query(p): Params) -> Result<Response, ApiError> {
    let rows = state.current().await.pending_items_by_product(as_of(&p)?).await?;
    Ok(Json(rows).into_response())
}

async fn top_customers(State(state): State<ServiceState>, Query(p): Params) -> Result<Response, ApiError> {
    let filter = status(&p, StatusFilter::Pending)?;
    let rows = state.current().await.top_customers(limit(&p)?, filter, as_of(&p)?).await?;
    Ok(Json(rows).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_a_model_a_running_pipeline_and_a_lag_within_the_bound() {
        let bound = Duration::from_secs(2);
        let running = PipelineStatus { running: true, lag_seconds: Some(1.5), ..PipelineStatus::default() };
        assert_eq!(not_ready(true, None, bound), None, "a fixed warehouse with a model");
        assert_eq!(not_ready(true, Some(&running), bound), None);
        assert!(not_ready(false, Some(&running), bound).is_some_and(|r| r.contains("no model yet")));
        let behind = PipelineStatus { lag_seconds: Some(2.5), ..running.clone() };
        assert!(
            not_ready(true, Some(&behind), bound).is_some_and(|r| r.contains("lag 2.5s exceeds the bound of 2.0s"))
        );
        let unmeasured = PipelineStatus { lag_seconds: None, ..running.clone() };
        assert_eq!(not_ready(true, Some(&unmeasured), bound), None, "no lag measured (trigger fallback)");
        let stopped = PipelineStatus { running: false, last_error: Some("slot dropped".into()), ..running };
        assert!(not_ready(true, Some(&stopped), bound).is_some_and(|r| r.contains("stopped: slot dropped")));
    }
}
