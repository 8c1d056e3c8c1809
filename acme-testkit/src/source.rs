//! The ACME source database objects, exactly as `shared/ACME.md` describes them.

use tokio_postgres::Client;

use crate::error::{HarnessError, Result};

/// Name of the publication the source DDL creates over the four tables.
pub const PUBLICATION: &str = "acme_publication";

/// The four source tables, in dependency order.
pub const TABLES: [&str; 4] = ["customers", "products", "orders", "order_items"];

/// DDL of schema `operations`: four tables, `REPLICA IDENTITY FULL`, and a publication.
pub const SOURCE_DDL: &str = r#"
CREATE SCHEMA IF NOT EXISTS operations;
CREATE TABLE operations.customers (
    customer_id bigserial PRIMARY KEY,
    customer_name varchar(500) NOT NULL,
    is_active boolean NOT NULL DEFAULT true,
    customer_address varchar(500),
    updated_at timestamp(3),
    updated_by bigint,
    created_at timestamp(3),
    created_by bigint
);
CREATE TABLE operations.products (
    product_id bigserial PRIMARY KEY,
    product_name varchar(500) NOT NULL,
    barcode varchar(26) NOT NULL,
    unity_price numeric NOT NULL,
    is_active boolean,
    updated_at timestamp(3),
    updated_by bigint,
    created_at timestamp(3),
    created_by bigint
);
CREATE TABLE operations.orders (
    order_id bigserial PRIMARY KEY,
    order_date date,
    delivery_date date,
    customer_id bigint,
    status varchar,
    updated_at timestamp(3),
    updated_by bigint,
    created_at timestamp(3),
    created_by bigint
);
CREATE TABLE operations.order_items (
    order_item_id bigserial PRIMARY KEY,
    order_id bigint,
    product_id bigint,
    quanity integer,
    updated_at timestamp(3),
    updated_by bigint,
    created_at timestamp(3),
    created_by bigint
);
ALTER TABLE operations.customers REPLICA IDENTITY FULL;
ALTER TABLE operations.products REPLICA IDENTITY FULL;
ALTER TABLE operations.orders REPLICA IDENTITY FULL;
ALTER TABLE operations.order_items REPLICA IDENTITY FULL;
CREATE PUBLICATION acme_publication FOR TABLE
    operations.customers, operations.products, operations.orders, operations.order_items;
"#;

/// Create schema `operations`, its four tables and the publication.
pub async fn create_source_schema(client: &Client) -> Result<()> {
    client
        .batch_execute(SOURCE_DDL)
        .await
        .map_err(|source| HarnessError::Sql { what: "creating the ACME source schema".into(), source })
}

/// Row counts of the four source tables, in [`TABLES`] order.
pub async fn table_counts(client: &Client) -> Result<[i64; 4]> {
    let mut counts = [0i64; 4];
    for (i, table) in TABLES.iter().enumerate() {
        let row = client
            .query_one(&format!("SELECT count(*) FROM operations.{table}"), &[])
            .await
            .map_err(|source| HarnessError::Sql { what: format!("counting operations.{table}"), source })?;
        counts[i] = row.get(0);
    }
    Ok(counts)
}
