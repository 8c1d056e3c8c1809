//! The HTTP service on the library: the seed's endpoints, each also taking `as_of`.
//!
//! | endpoint | report |
//! |---|---|
//! | `GET /health` | liveness and what the warehouse covers |
//! | `GET /analytics/orders?status=open&as_of=` | R1 orders by delivery date and status |
//! | `GET /analytics/orders/top?limit=3&as_of=` | R2 top delivery dates by open orders |
//! | `GET /analytics/orders/product?as_of=` | R3 items of open orders by product |
//! | `GET /analytics/orders/customers?status=pending&limit=3&as_of=` | R4 top customers |
//!
//! Bad parameters answer 400 with `{"error": "..."}`; `as_of` is RFC 3339.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::sync::watch;

use crate::query::{QueryError, StatusFilter, Warehouse};

/// The warehouse the service answers from: a fixed handle (swapped with
/// [`ServiceState::replace`]) or the handles a running [`crate::Pipeline`] publishes.
#[derive(Clone, Debug)]
pub struct ServiceState {
    warehouse: watch::Receiver<Arc<Warehouse>>,
    replace: Option<Arc<watch::Sender<Arc<Warehouse>>>>,
}

impl ServiceState {
    /// Serve `warehouse`.
    pub fn new(warehouse: Warehouse) -> Self {
        let (sender, warehouse) = watch::channel(Arc::new(warehouse));
        Self { warehouse, replace: Some(Arc::new(sender)) }
    }

    /// Serve the newest handle of a running pipeline ([`crate::Pipeline::warehouses`]): each
    /// request answers from the newest consistent state.
    pub fn live(warehouses: watch::Receiver<Arc<Warehouse>>) -> Self {
        Self { warehouse: warehouses, replace: None }
    }

    /// Swap in a newer warehouse view (queries in flight finish on the old one). A live state
    /// follows its pipeline instead and ignores this.
    pub async fn replace(&self, warehouse: Warehouse) {
        if let Some(sender) = &self.replace {
            sender.send_replace(Arc::new(warehouse));
        }
    }

    async fn current(&self) -> Arc<Warehouse> {
        Arc::clone(&*self.warehouse.borrow())
    }
}

/// The service's routes.
pub fn router(state: ServiceState) -> Router {
    Router::new()
        .route("/health", get(health))
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

async fn health(State(state): State<ServiceState>) -> Json<serde_json::Value> {
    let w = state.current().await;
    Json(json!({
        "status": "ok",
        "history_start": w.history_start(),
        "raw_position": w.raw_position(),
        "model_position": w.model_position(),
    }))
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
