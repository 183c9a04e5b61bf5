"""The batch-recompute peer: DuckDB computing Strata's batch views over the same Parquet files.

    python duckdb_views.py MASTER_DIR OUT_JSON [--threads N] [--out-dir DIR]

Timed as `duckdb.views` (the work Strata's batch layer does, and only that): read every segment
of the master dataset (`MASTER_DIR/*/*.parquet`), keep one copy of each event id (Strata's dedupe
rule, for copies close in time as the generator makes them), compute every view Strata's
version holds (item totals; item and overall series per minute, hour and day with distinct users
estimated, as Strata's HyperLogLog does; distinct users per item and day, estimated; device
liveness and reading statistics, overall and per metric and hour; each user's items with the
latest time, and each item's users, per basis view and purchase), and write each result table
to Parquet in `--out-dir` (default: a temporary directory), as Strata writes its version.

Timed apart and not part of that figure: `duckdb.cooccurrence_self_join`, counting for each pair
of items the users who bought both (Strata does not precompute it; its serving layer intersects
audiences per query).

Then, untimed, the exact distinct counts and the rows and digests `strata-bench compare-batch`
checks against Strata's published version go to OUT_JSON. Prints `name value unit` lines.
"""

import json
import os
import sys
import tempfile
import time

import duckdb

TYPES = ["view", "add_to_cart", "purchase", "rating", "heartbeat", "reading"]
GRANS = ["minute", "hour", "day"]


def main() -> int:
    args = sys.argv[1:]
    threads = 2
    out_dir = None
    for flag in ["--threads", "--out-dir"]:
        if flag in args:
            i = args.index(flag)
            if flag == "--threads":
                threads = int(args[i + 1])
            else:
                out_dir = args[i + 1]
            del args[i : i + 2]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    master, out = args
    scratch = None
    if out_dir is None:
        scratch = tempfile.TemporaryDirectory()
        out_dir = scratch.name
    os.makedirs(out_dir, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute("SET TimeZone = 'UTC'")
    glob = f"{master}/*/*.parquet"

    counts = ", ".join(f"count(*) FILTER (type = '{t}') AS n_{t}" for t in TYPES)
    item_aggs = """count(*) FILTER (type = 'view') AS views,
        count(*) FILTER (type = 'add_to_cart') AS carts,
        count(*) FILTER (type = 'purchase') AS purchases,
        coalesce(sum(qty) FILTER (type = 'purchase'), 0) AS quantity,
        coalesce(sum(qty * price) FILTER (type = 'purchase'), 0) AS revenue,
        count(*) FILTER (type = 'rating') AS ratings,
        coalesce(sum(rating) FILTER (type = 'rating'), 0) AS rating_sum,
        min(category) AS category"""
    reading_aggs = """count(value) AS readings,
        coalesce(sum(round(value * 1000000)::HUGEINT), 0) AS sum_micros,
        min(value) AS min, max(value) AS max"""
    tables = ["items", "item_day_users", "devices", "device_metric_hour", "user_items", "item_users"]

    t0 = time.perf_counter()
    con.execute(
        f"""CREATE TEMP TABLE ev AS
            SELECT * FROM read_parquet('{glob}')
            QUALIFY row_number() OVER (PARTITION BY id ORDER BY _offset) = 1"""
    )
    con.execute(
        f"CREATE TEMP TABLE items AS SELECT item, {item_aggs} FROM ev WHERE item IS NOT NULL GROUP BY item"
    )
    for gran in GRANS:
        con.execute(
            f"""CREATE TEMP TABLE item_{gran} AS SELECT item, epoch_ms(date_trunc('{gran}', ts)) AS b,
                {item_aggs} FROM ev WHERE item IS NOT NULL GROUP BY item, b"""
        )
        con.execute(
            f"""CREATE TEMP TABLE series_{gran} AS SELECT epoch_ms(date_trunc('{gran}', ts)) AS b,
                {counts}, coalesce(sum(qty) FILTER (type = 'purchase'), 0) AS quantity,
                coalesce(sum(qty * price) FILTER (type = 'purchase'), 0) AS revenue,
                approx_count_distinct(user) AS users
                FROM ev GROUP BY b"""
        )
        tables += [f"item_{gran}", f"series_{gran}"]
    con.execute(
        """CREATE TEMP TABLE item_day_users AS SELECT item, epoch_ms(date_trunc('day', ts)) AS d,
           approx_count_distinct(user) AS users FROM ev WHERE item IS NOT NULL GROUP BY item, d"""
    )
    con.execute(
        f"""CREATE TEMP TABLE devices AS SELECT device, epoch_ms(max(ts)) AS last_seen,
           count(*) FILTER (type = 'heartbeat') AS heartbeats, {reading_aggs}
           FROM ev WHERE device IS NOT NULL GROUP BY device"""
    )
    con.execute(
        f"""CREATE TEMP TABLE device_metric_hour AS SELECT device, metric,
           epoch_ms(date_trunc('hour', ts)) AS h, epoch_ms(max(ts)) AS last_seen, {reading_aggs}
           FROM ev WHERE type = 'reading' GROUP BY device, metric, h"""
    )
    con.execute(
        """CREATE TEMP TABLE user_item_last AS SELECT type, user, item, epoch_ms(max(ts)) AS last
           FROM ev WHERE type IN ('view', 'purchase') GROUP BY type, user, item"""
    )
    con.execute(
        """CREATE TEMP TABLE user_items AS SELECT type, user, list(item ORDER BY item) AS items,
           list(last ORDER BY item) AS lasts FROM user_item_last GROUP BY type, user"""
    )
    con.execute(
        """CREATE TEMP TABLE item_users AS SELECT type, item, list(user ORDER BY user) AS users
           FROM user_item_last GROUP BY type, item"""
    )
    for t in tables:
        con.execute(f"COPY {t} TO '{out_dir}/{t}.parquet' (FORMAT parquet)")
    views = time.perf_counter() - t0

    t2 = time.perf_counter()
    pairs = con.execute(
        """WITH p AS (SELECT user, item FROM user_item_last WHERE type = 'purchase')
           SELECT count(*), coalesce(sum(n), 0) FROM (
             SELECT a.item, b.item, count(*) AS n FROM p a JOIN p b
             ON a.user = b.user AND a.item <> b.item GROUP BY a.item, b.item)"""
    ).fetchone()
    self_join = time.perf_counter() - t2
    events = con.execute("SELECT count(*) FROM ev").fetchone()[0]

    for name, value in [("duckdb.views", views), ("duckdb.cooccurrence_self_join", self_join)]:
        print(f"{name} {value:.3f} s")
    print(f"duckdb.events {events} count")
    print(f"duckdb.item_pairs {pairs[0]} count")

    # Untimed from here: what compare-batch checks.
    def micros(v):
        # DECIMAL(18, 6) times an integer is exact; in millionths, as text.
        return str(int((v * 1_000_000).to_integral_value())) if v is not None else "0"

    items = con.execute("SELECT * FROM items").fetchall()
    series = {}
    item_series = {}
    for gran in GRANS:
        series[gran] = con.execute(
            f"""SELECT s.*, x.exact FROM series_{gran} s JOIN (SELECT
                epoch_ms(date_trunc('{gran}', ts)) AS b, count(DISTINCT user) AS exact
                FROM ev GROUP BY b) x USING (b) ORDER BY b"""
        ).fetchall()
        # A digest of every row: counts, sums and a time-weighted sum that moves if any event
        # lands in another bucket.
        d = con.execute(
            f"""SELECT count(*), sum(views), sum(carts), sum(purchases), sum(quantity),
                sum(revenue), sum(ratings), sum(rating_sum),
                sum((b // 60000)::HUGEINT * (views + carts + purchases + ratings)),
                count(DISTINCT item) FROM item_{gran}"""
        ).fetchone()
        item_series[gran] = {
            "rows": d[0],
            "views": int(d[1] or 0),
            "carts": int(d[2] or 0),
            "purchases": int(d[3] or 0),
            "quantity": int(d[4] or 0),
            "revenue_micros": micros(d[5]),
            "ratings": int(d[6] or 0),
            "rating_sum": int(d[7] or 0),
            "weighted": str(int(d[8] or 0)),
            "items": d[9],
        }
    day_users = con.execute(
        """SELECT u.item, u.d, count(DISTINCT e.user) FROM item_day_users u JOIN ev e
           ON e.item = u.item AND epoch_ms(date_trunc('day', e.ts)) = u.d GROUP BY u.item, u.d"""
    ).fetchall()
    devices = con.execute("SELECT * FROM devices").fetchall()
    dmh = con.execute("SELECT * FROM device_metric_hour").fetchall()
    sets = {}
    for basis in ["view", "purchase"]:
        u = con.execute(
            f"""SELECT count(*), coalesce(sum(len(items)), 0),
                coalesce(sum(list_sum(lasts)::HUGEINT), 0) FROM user_items WHERE type = '{basis}'"""
        ).fetchone()
        i = con.execute(
            f"""SELECT count(*), coalesce(sum(len(users)), 0) FROM item_users
                WHERE type = '{basis}'"""
        ).fetchone()
        sets[basis] = {
            "users": u[0],
            "user_items": int(u[1]),
            "last_sum": str(int(u[2])),
            "items": i[0],
            "item_users": int(i[1]),
        }

    def reading(r):
        return {"readings": r[0], "sum_micros": str(int(r[1])), "min": r[2], "max": r[3]}

    result = {
        "threads": threads,
        "events": events,
        "secs": {"views": views, "self_join": self_join},
        "pairs": {"pairs": pairs[0], "sum": int(pairs[1])},
        "items": {
            r[0]: {
                "views": r[1],
                "carts": r[2],
                "purchases": r[3],
                "quantity": int(r[4]),
                "revenue_micros": micros(r[5]),
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
                    "revenue_micros": micros(r[8]),
                    "users_approx": r[9],
                    "users": r[10],
                }
                for r in rows
            ]
            for gran, rows in series.items()
        },
        "item_series": item_series,
        "item_day_users": [{"item": r[0], "day": r[1], "users": r[2]} for r in day_users],
        "devices": {
            r[0]: {"last_seen": r[1], "heartbeats": r[2], **reading(r[3:7])} for r in devices
        },
        "device_metric_hour": [
            {"device": r[0], "metric": r[1], "start": r[2], "last_seen": r[3], **reading(r[4:8])}
            for r in dmh
        ],
        "sets": sets,
    }
    with open(out, "w") as f:
        json.dump(result, f)
    if scratch is not None:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
