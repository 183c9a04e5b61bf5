"""The batch-recompute peer: DuckDB computing Strata's aggregate views over the same Parquet files.

    python duckdb_views.py MASTER_DIR OUT_JSON [--threads N]

Reads every segment of the master dataset (`MASTER_DIR/*/*.parquet`), keeps one copy of each
event id (Strata's dedupe rule, for copies close in time as the generator makes them), and
computes what Strata's batch layer computes: item totals, item and overall series per minute,
hour and day (counts per type, units, revenue, distinct users), distinct users per item and day,
device liveness and reading statistics. Then, timed apart, the co-occurrence work: the
user -> items and item -> users sets Strata keeps, and the self-join counting, for each pair of
items, the users who bought both.

Prints `name value unit` lines (seconds) and writes OUT_JSON with the timings and the results
that `strata-bench compare-batch` checks against Strata's published version.
"""

import json
import sys
import time

import duckdb

TYPES = ["view", "add_to_cart", "purchase", "rating", "heartbeat", "reading"]


def main() -> int:
    args = sys.argv[1:]
    threads = 2
    if "--threads" in args:
        i = args.index("--threads")
        threads = int(args[i + 1])
        del args[i : i + 2]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    master, out = args
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute("SET TimeZone = 'UTC'")
    glob = f"{master}/*/*.parquet"

    t0 = time.perf_counter()
    con.execute(
        f"""CREATE TEMP TABLE ev AS
            SELECT * FROM read_parquet('{glob}')
            QUALIFY row_number() OVER (PARTITION BY id ORDER BY _offset) = 1"""
    )
    counts = ", ".join(f"count(*) FILTER (type = '{t}') AS n_{t}" for t in TYPES)
    item_aggs = """count(*) FILTER (type = 'view') AS views,
        count(*) FILTER (type = 'add_to_cart') AS carts,
        count(*) FILTER (type = 'purchase') AS purchases,
        coalesce(sum(qty) FILTER (type = 'purchase'), 0) AS quantity,
        coalesce(sum(qty * price) FILTER (type = 'purchase'), 0) AS revenue,
        count(*) FILTER (type = 'rating') AS ratings,
        coalesce(sum(rating) FILTER (type = 'rating'), 0) AS rating_sum,
        min(category) AS category"""
    items = con.execute(
        f"SELECT item, {item_aggs} FROM ev WHERE item IS NOT NULL GROUP BY item"
    ).fetchall()
    series = {}
    for gran in ["minute", "hour", "day"]:
        con.execute(
            f"""CREATE TEMP TABLE item_{gran} AS SELECT item, date_trunc('{gran}', ts) AS b,
                {item_aggs} FROM ev WHERE item IS NOT NULL GROUP BY item, b"""
        )
        series[gran] = con.execute(
            f"""SELECT epoch_ms(date_trunc('{gran}', ts)) AS b, {counts},
                coalesce(sum(qty) FILTER (type = 'purchase'), 0),
                coalesce(sum(qty * price) FILTER (type = 'purchase'), 0),
                approx_count_distinct(user), count(DISTINCT user)
                FROM ev GROUP BY b ORDER BY b"""
        ).fetchall()
    con.execute(
        """CREATE TEMP TABLE item_day_users AS SELECT item, date_trunc('day', ts) AS d,
           approx_count_distinct(user) AS users FROM ev WHERE item IS NOT NULL GROUP BY item, d"""
    )
    con.execute(
        """CREATE TEMP TABLE devices AS SELECT device, max(ts) AS last_seen,
           count(*) FILTER (type = 'heartbeat') AS heartbeats, count(value) AS readings,
           sum(value) AS sum, min(value) AS min, max(value) AS max
           FROM ev WHERE device IS NOT NULL GROUP BY device"""
    )
    con.execute(
        """CREATE TEMP TABLE device_metric_hour AS SELECT device, metric,
           date_trunc('hour', ts) AS h, count(*) AS n, sum(value) AS sum, min(value) AS min,
           max(value) AS max FROM ev WHERE type = 'reading' GROUP BY device, metric, h"""
    )
    aggregates = time.perf_counter() - t0

    t1 = time.perf_counter()
    con.execute(
        """CREATE TEMP TABLE user_items AS SELECT type, user, item, max(ts) AS last
           FROM ev WHERE type IN ('view', 'purchase') GROUP BY type, user, item"""
    )
    sets = time.perf_counter() - t1
    t2 = time.perf_counter()
    pairs = con.execute(
        """WITH p AS (SELECT user, item FROM user_items WHERE type = 'purchase')
           SELECT count(*), coalesce(sum(n), 0) FROM (
             SELECT a.item, b.item, count(*) AS n FROM p a JOIN p b
             ON a.user = b.user AND a.item <> b.item GROUP BY a.item, b.item)"""
    ).fetchone()
    self_join = time.perf_counter() - t2
    events = con.execute("SELECT count(*) FROM ev").fetchone()[0]

    for name, value in [
        ("duckdb.aggregates", aggregates),
        ("duckdb.cooccurrence_sets", sets),
        ("duckdb.cooccurrence_self_join", self_join),
    ]:
        print(f"{name} {value:.3f} s")
    print(f"duckdb.events {events} count")
    print(f"duckdb.item_pairs {pairs[0]} count")

    def num(v):
        return str(v) if v is not None else "0"

    result = {
        "threads": threads,
        "events": events,
        "secs": {"aggregates": aggregates, "sets": sets, "self_join": self_join},
        "pairs": {"pairs": pairs[0], "sum": int(pairs[1])},
        "items": {
            r[0]: {
                "views": r[1],
                "carts": r[2],
                "purchases": r[3],
                "quantity": int(r[4]),
                # DECIMAL(18, 6) times an integer: exact; in millionths as text.
                "revenue_micros": num(int((r[5] * 1_000_000).to_integral_value())),
                "ratings": r[6],
                "rating_sum": int(r[7]),
                "category": r[8],
            }
            for r in items
        },
        "series": {
            gran: [
                {
                    "start": r[0],
                    "counts": list(r[1:7]),
                    "quantity": int(r[7]),
                    "revenue_micros": num(int((r[8] * 1_000_000).to_integral_value())),
                    "users_approx": r[9],
                    "users": r[10],
                }
                for r in rows
            ]
            for gran, rows in series.items()
        },
    }
    with open(out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
