//! What the routes answer from: the serving state (where the partials come from, and their
//! merge) and what the queries keep between requests. The state knows nothing of the queries;
//! the queries read the state and are handed what they keep; the routes hold both.

use std::ops::Deref;
use std::sync::Arc;

use crate::answers::Answers;
use crate::metrics::HttpMetrics;
use crate::rankings::TotalsMemo;
use crate::recommend::CoMemo;
use crate::state::ServingState;

pub struct App {
    pub state: Arc<ServingState>,
    /// Request counts and latencies per route.
    pub http_metrics: HttpMetrics,
    /// Queries that scan or fan out (everything but point lookups) run on the blocking pool,
    /// as many at once as there are cores: more would only take turns on the same cores while
    /// each holds its working set, and the extra threads evict each other's caches.
    pub heavy: tokio::sync::Semaphore,
    /// Rendered answers of the current state.
    pub answers: Answers,
    /// Co-occurrence rows of the items asked about, for the current state.
    pub co_rows: CoMemo,
    /// Windowed item totals and their rankings, for the states asked about.
    pub windows: TotalsMemo,
}

impl App {
    pub fn new(state: Arc<ServingState>) -> Self {
        let serve = &state.cfg.serve;
        App {
            http_metrics: HttpMetrics::default(),
            heavy: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
            answers: Answers::new(serve.answer_cache),
            co_rows: CoMemo::new(crate::recommend::memo_rows(serve.memo_mb / 2)),
            windows: TotalsMemo::default(),
            state,
        }
    }
}

impl Deref for App {
    type Target = ServingState;

    fn deref(&self) -> &ServingState {
        &self.state
    }
}
