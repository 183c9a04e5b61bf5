"""Constraints between query parameters that OpenAPI 3.0 cannot state, for schemathesis.

The serving layer answers 400 to these combinations (its OpenAPI document says so in each
operation's description); the schema alone makes them look valid, so the generated requests
that break them are dropped rather than reported as "valid data rejected":

- trending: `baseline` must be longer than `window` (1h < 24h < 7d);
- timeseries: `from` not after `to`, and at most 10,000 buckets from one to the other (both
  floored to the bucket; `to` defaults to now, `from` to 59 buckets before `to`);
  `metric=distinct_users` takes no `type`, and with `item` only `bucket=day`.

Each rule here mirrors one check in serving-layer/src/insights.rs; routes.rs tests the 400s.
"""

from datetime import datetime, timezone

import schemathesis

HOURS = {"1h": 1, "24h": 24, "7d": 168}
BUCKET_MS = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000}
MAX_BUCKETS = 10_000


def _millis(text):
    try:
        t = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return int(t.timestamp() * 1000)


@schemathesis.hook
def filter_case(ctx, case):
    """Applied in every phase (a `filter_query` hook is not, in the coverage phase)."""
    query = case.query
    if not isinstance(query, dict):
        return True
    path = case.operation.path
    if path == "/v1/insights/trending":
        window = HOURS.get(str(query.get("window", "1h")))
        baseline = HOURS.get(str(query.get("baseline", "7d")))
        if window is not None and baseline is not None:
            return baseline > window
    if path == "/v1/insights/timeseries":
        bucket = str(query.get("bucket", "hour"))
        if str(query.get("metric", "events")) == "distinct_users":
            if "type" in query or ("item" in query and bucket != "day"):
                return False
        g = BUCKET_MS.get(bucket)
        if g is None:
            return True
        now = int(datetime.now(timezone.utc).timestamp() * 1000)
        to = _millis(query["to"]) if "to" in query else now
        if to is None:
            return True
        to -= to % g
        start = _millis(query["from"]) if "from" in query else to - 59 * g
        if start is None:
            return True
        start -= start % g
        return start <= to and (to - start) // g + 1 <= MAX_BUCKETS
    return True
