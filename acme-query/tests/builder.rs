//! `Warehouse::builder`: the caller's object store, session settings, memory limit and setup,
//! and what the caller registers on a handle, all kept across refreshes.

use std::sync::Arc;

use acme_model::ModelBuild;
use acme_query::Warehouse;
use acme_query::datafusion::arrow::datatypes::DataType;
use acme_query::datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};

use acme_ingest::ChangeStream;

use crate::{acme, oracle, scalar, warehouse_config, workload};

/// A scalar UDF `name(bigint) -> bigint` adding `delta`.
fn shift(name: &str, delta: i64) -> acme_query::datafusion::logical_expr::ScalarUDF {
    create_udf(
        name,
        vec![DataType::Int64],
        DataType::Int64,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            let [value] = args else { unreachable!("one argument") };
            let value = value.to_array(1)?;
            let delta = ColumnarValue::Scalar(delta.into()).to_array(value.len())?;
            Ok(ColumnarValue::Array(acme_query::datafusion::arrow::compute::kernels::numeric::add(&value, &delta)?))
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_opened_warehouse_keeps_the_callers_settings_and_registrations_across_refreshes() {
    // The warehouse on a real S3 API server.
    let moto = acme_testkit::MotoServer::start().expect("moto S3 server");
    moto.create_bucket("acme-builder").expect("bucket");
    let url = acme_testkit::acme_database("builder", Some((0.002, 41))).await.expect("source");
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = warehouse_config(&url, dir.path());
    config.storage_url = "s3://acme-builder/warehouse".into();
    config.storage_options = moto.storage_options();
    let mut stream = ChangeStream::open(config.clone()).await.expect("snapshot to S3");
    let client = acme_testkit::connect(&url).await.expect("connect");
    ModelBuild::new(config.clone()).await.expect("first build");

    // The caller's store for that bucket, under a scheme acme has no store for: every read
    // must go through it.
    let mut s3 = object_store::aws::AmazonS3Builder::new().with_bucket_name("acme-builder");
    for (key, value) in moto.storage_options() {
        s3 = s3.with_config(key.parse().expect("an S3 option"), value);
    }
    let store = Arc::new(s3.build().expect("the caller's S3 store"));
    let mut w = Warehouse::builder("acme-caller://acme-builder/warehouse")
        .object_store(store)
        .session_config(Warehouse::default_session_config().with_target_partitions(3))
        .on_context(|ctx| {
            ctx.register_udf(shift("plus_one", 1));
            Ok(())
        })
        .open()
        .await
        .expect("open through the caller's store");
    w.context().register_udf(shift("minus_one", -1));
    w.sql("CREATE TABLE callers_table AS VALUES (41), (42)").await.expect("a table of the caller's");
    assert_eq!(acme(&w, 3, None).await, oracle(&client, 3).await, "reports through the caller's store");

    for round in 0..2u64 {
        acme_testkit::run_workload(&url, &workload(4100 + round, 100, 2)).await.expect("workload");
        stream.catch_up().await.expect("catch up");
        assert!(w.refresh().await.expect("refresh"), "the raw layer moved, round {round}");
        assert_eq!(acme(&w, 3, None).await, oracle(&client, 3).await, "refreshed, round {round}");
        let state = w.context().state();
        assert_eq!(state.config().target_partitions(), 3, "the caller's session settings stay");
        assert_eq!(scalar(&w, "SELECT plus_one(41)").await, 42, "the setup's UDF, round {round}");
        assert_eq!(scalar(&w, "SELECT minus_one(43)").await, 42, "a UDF registered on the handle, round {round}");
        assert_eq!(scalar(&w, "SELECT sum(column1) FROM callers_table").await, 83, "the caller's table");
        let fresh = Warehouse::open_with_options(&config.storage_url, config.storage_options.clone())
            .await
            .expect("open with acme's own store");
        assert_eq!(w.raw_position(), fresh.raw_position(), "the same state as a handle with acme's store");
    }

    // A memory limit bounds queries: a join whose build side needs more than it fails with
    // DataFusion's resources error instead of growing the process. (The tail is folded first:
    // applying a tail while loading a handle sorts, and 16 KiB would stop that too.)
    ModelBuild::new(config.clone()).await.expect("fold the tail");
    let limited = Warehouse::builder(&config.storage_url)
        .storage_options(config.storage_options.clone())
        .memory_limit(16 << 10)
        .open()
        .await
        .expect("open limited");
    let join = "SELECT count(*) FROM raw_order_items i JOIN raw_orders o ON i.order_id = o.order_id";
    let error = match limited.sql(join).await {
        Ok(frame) => frame.collect().await.expect_err("the join exceeds 16 KiB").to_string(),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("Resources exhausted"), "{error}");
    assert!(scalar(&w, join).await > 0, "unlimited, the same join runs");
}
