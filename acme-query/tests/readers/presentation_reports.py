"""An outside reader of acme's presentation layer: delta-rs (the `deltalake` Python binding)
opens the star-schema tables and DuckDB answers R1, R3 and R4 as dimensional queries over
them: the fact rows in force (`is_current`), filtered by the status flags, and the customer
dimension's version in force. Prints the model position and the three reports as JSON.

A model build commits its tables one after the other and then writes `_acme/model.json`, the
Delta version of each table it committed, with the source position they hold. A reader that
joins tables opens each at the version that manifest names, so it sees every table at one
position even while a build is half-way through its commits (the latest version of each table
would mix two builds). With no manifest (a warehouse with no model build yet, or `--latest`),
the latest versions are read.

acme marks the rows a model step supersedes with Delta deletion vectors. delta-rs's
`QueryBuilder` applies them (its `to_pyarrow_dataset` refuses a table with the feature), so
each table is read through it and handed to DuckDB as Arrow.

Usage: python presentation_reports.py <warehouse directory> [--latest]
"""

import json
import os
import sys

import duckdb
import pyarrow as pa
from deltalake import DeltaTable, QueryBuilder

warehouse = sys.argv[1]
manifest_path = os.path.join(warehouse, "_acme", "model.json")
manifest = None
if "--latest" not in sys.argv[2:] and os.path.exists(manifest_path):
    with open(manifest_path) as f:
        manifest = json.load(f)
con = duckdb.connect()
for table in ["fact_orders", "fact_order_items", "dim_customer"]:
    version = manifest["tables"].get(f"presentation/{table}") if manifest else None
    delta = DeltaTable(f"{warehouse}/presentation/{table}", version=version)
    rows = QueryBuilder().register(table, delta).execute(f"SELECT * FROM {table}").read_all()
    con.register(table, pa.table(rows))

r1 = con.execute(
    """SELECT CAST(f.delivery_date AS VARCHAR), f.status, count(*)
       FROM fact_orders f WHERE f.is_current AND f.is_open
       GROUP BY f.delivery_date, f.status ORDER BY f.delivery_date NULLS LAST, f.status NULLS LAST"""
).fetchall()
r3 = con.execute(
    """SELECT i.product_id, CAST(sum(i.quantity) AS BIGINT)
       FROM fact_order_items i JOIN fact_orders o ON o.order_id = i.order_id
       WHERE i.is_current AND o.is_current AND o.is_open
       GROUP BY i.product_id ORDER BY 2 DESC NULLS FIRST, i.product_id NULLS LAST"""
).fetchall()
r4 = con.execute(
    """WITH counts AS (SELECT f.customer_id, count(*) AS quantity FROM fact_orders f
         WHERE f.is_current AND f.is_pending GROUP BY f.customer_id),
       ranked AS (SELECT customer_id, quantity, dense_rank() OVER (ORDER BY quantity DESC) AS ranking FROM counts)
       SELECT r.customer_id, c.customer_name, r.quantity, r.ranking FROM ranked r
       LEFT JOIN dim_customer c ON c.customer_id = r.customer_id AND c.is_current AND c.customer_sk >= 0
       WHERE r.ranking <= 3 ORDER BY r.ranking, r.customer_id NULLS LAST"""
).fetchall()
print(json.dumps({"position": manifest["position"] if manifest else None, "r1": r1, "r3": r3, "r4": r4}, default=str))
sys.stdout.flush()
# The answer is out. Leave without running the native libraries' destructors: pyarrow's and
# delta-rs's worker threads can abort the interpreter's shutdown now and then ("terminate
# called without an active exception", a known shutdown-order problem of these bindings).
os._exit(0)
