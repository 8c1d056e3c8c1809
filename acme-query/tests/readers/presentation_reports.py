"""An outside reader of acme's presentation layer: delta-rs (the `deltalake` Python binding)
opens the latest Delta version of each star-schema table, and DuckDB answers R1, R3 and R4 as
dimensional queries over them: the fact rows in force (`is_current`; as of an instant, the rows
whose `valid_from`-`valid_to` holds it), filtered by the status flags, and the customer
dimension's version in force. Prints the three reports as JSON.

Usage: python presentation_reports.py <warehouse directory>
"""

import json
import sys

import duckdb
from deltalake import DeltaTable

warehouse = sys.argv[1]
con = duckdb.connect()
for table in ["fact_orders", "fact_order_items", "dim_customer"]:
    dataset = DeltaTable(f"{warehouse}/presentation/{table}").to_pyarrow_dataset()
    con.register(table, dataset)

r1 = con.execute(
    """SELECT CAST(f.delivery_date AS VARCHAR), f.status, count(*)
       FROM fact_orders f WHERE f.is_current AND f.is_open
       GROUP BY f.delivery_date, f.status ORDER BY f.delivery_date NULLS LAST, f.status NULLS LAST"""
).fetchall()
r3 = con.execute(
    """SELECT i.product_id, CAST(sum(i.quantity) AS BIGINT)
       FROM fact_order_items i JOIN fact_orders o ON o.order_id = i.order_id
       WHERE i.is_current AND o.is_current AND o.is_open
       GROUP BY i.product_id ORDER BY 2 DESC, i.product_id NULLS LAST"""
).fetchall()
r4 = con.execute(
    """WITH counts AS (SELECT f.customer_id, count(*) AS quantity FROM fact_orders f
         WHERE f.is_current AND f.is_pending GROUP BY f.customer_id),
       ranked AS (SELECT customer_id, quantity, dense_rank() OVER (ORDER BY quantity DESC) AS ranking FROM counts)
       SELECT r.customer_id, c.customer_name, r.quantity, r.ranking FROM ranked r
       LEFT JOIN dim_customer c ON c.customer_id = r.customer_id AND c.is_current AND c.customer_sk >= 0
       WHERE r.ranking <= 3 ORDER BY r.ranking, r.customer_id NULLS LAST"""
).fetchall()
print(json.dumps({"r1": r1, "r3": r3, "r4": r4}, default=str))
