//! The recompute as one DataFusion plan, run in this process or on a Ballista cluster.
//!
//! ```text
//! per partition p (its segments from the rollup generation's end, as the local engine reads):
//!   scan Parquet (one file group, offset order) -> filter _offset < cutoff(p)
//!     -> strata_fold(params(p), columns... ORDER BY _offset)        one record list
//! union of the partitions -> unnest -> group by key: strata_merge(value)
//!   (a partial merge per partition, then the final merge of every partition's partials)
//! ```
//!
//! Each partition's scan is one file group: a partition's rows reach its fold whole and in
//! offset order (the fold checks both). On Ballista each partition's fold, unnest and partial
//! merge is a task on an executor, and the final merge a task after the shuffle. The records
//! come back to this process, which publishes them exactly as the local engine does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::SessionStateBuilder;
use datafusion::functions::core::expr_fn::get_field;
use datafusion::logical_expr::{AggregateUDF, ExprFunctionExt};
use datafusion::prelude::{col, lit, DataFrame, SessionConfig, SessionContext};
use rayon::prelude::*;
use strata_batch::recompute::{self, Folded, Inputs, PartitionFold};
use strata_common::batch_store::Manifest;
use strata_common::config::{Config, Engine};
use strata_common::handoff::Partition;
use strata_common::views::{Partial, ViewKey};

use crate::functions::{self, records, FoldParams, COLUMNS};

/// The session settings every engine's plan needs (the client's, the scheduler's and each
/// executor's): a partition's rows stay in one stream, in offset order. One target partition
/// makes each partition's scan one file group (DataFusion splits a table's files into that many
/// groups, and a fold of half a partition cannot be merged with the other half); the folds still
/// run side by side, one stream (one task, on Ballista) per partition.
pub fn configure(mut config: SessionConfig) -> SessionConfig {
    let o = config.options_mut();
    o.execution.target_partitions = 1;
    o.optimizer.enable_round_robin_repartition = false;
    o.optimizer.repartition_file_scans = false;
    config
}

/// Largest gRPC message between Strata's Ballista processes and the client. A batch of records
/// can be far past gRPC's default 16 MiB (31 MB seen at 10M events: 8,192 keys' partials, some
/// an item's whole audience).
pub const GRPC_MAX_MESSAGE: u32 = 1 << 30;

/// [`configure`], and Ballista's own settings: its adaptive planner is off, as its first
/// stage's outputs reach a single final task twice through `CoalescePartitionsExec` under it (a
/// key merged twice; the merge refuses it: seen with Ballista 55); and its clients take
/// messages up to [`GRPC_MAX_MESSAGE`].
pub fn configure_ballista(config: SessionConfig) -> datafusion::error::Result<SessionConfig> {
    let mut config = configure(config);
    let o = config.options_mut();
    o.set("ballista.planner.adaptive.enabled", "false")?;
    o.set(
        "ballista.client.grpc_max_message_size",
        &GRPC_MAX_MESSAGE.to_string(),
    )?;
    Ok(config)
}

/// A session on `engine`, knowing Strata's functions.
pub async fn context(engine: &Engine) -> Result<SessionContext> {
    match engine {
        Engine::Local => {
            bail!("batch.engine = \"local\" runs in the batch layer, not on DataFusion")
        }
        Engine::DataFusion => {
            let ctx = SessionContext::new_with_config(configure(SessionConfig::new()));
            for f in functions::all() {
                ctx.register_udaf(f.as_ref().clone());
            }
            Ok(ctx)
        }
        Engine::Ballista(url) => {
            use ballista::prelude::{SessionConfigExt, SessionContextExt};
            let mut state = SessionStateBuilder::new()
                .with_config(configure_ballista(SessionConfig::new_with_ballista())?)
                .with_default_features()
                .build();
            for f in functions::all() {
                datafusion::execution::FunctionRegistry::register_udaf(&mut state, f)?;
            }
            SessionContext::remote_with_state(url, state)
                .await
                .with_context(|| {
                    format!("cannot reach the Ballista scheduler at {url} (batch.engine)")
                })
        }
    }
}

/// Recomputes every view on the engine `batch.engine` names and publishes the version.
pub async fn recompute(cfg: &Config) -> Result<Manifest> {
    let engine = cfg.batch.engine()?;
    let inputs = recompute::inputs(cfg)?;
    let ctx = context(&engine).await?;
    let folded = fold(&ctx, cfg, &inputs, &format!("{engine:?}")).await?;
    Ok(recompute::publish(cfg, &inputs, folded)?)
}

/// One partition's scan and fold.
async fn partition_frame(
    ctx: &SessionContext,
    inputs: &Inputs,
    p: Partition,
    params: &FoldParams,
) -> Result<Option<DataFrame>> {
    let wanted = inputs.wanted(p);
    if wanted.is_empty() {
        return Ok(None);
    }
    let mut urls = Vec::with_capacity(wanted.len());
    for s in &wanted {
        let path = s
            .path
            .to_str()
            .ok_or_else(|| anyhow!("{}: not UTF-8", s.path.display()))?;
        if !path.ends_with(".parquet") {
            bail!(
                "{path}: a segment in JSON lines; strata-engine reads Parquet segments only (batch.engine = \"local\" reads both)"
            );
        }
        urls.push(ListingTableUrl::parse(path)?);
    }
    let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
        .with_file_extension(".parquet")
        .with_file_sort_order(vec![vec![col("_offset").sort(true, false)]]);
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .infer_schema(&ctx.state())
        .await?;
    let table = ListingTable::try_new(config)?;
    let fold = AggregateUDF::from(functions::Fold::new());
    let args = std::iter::once(lit(serde_json::to_string(params)?))
        .chain(COLUMNS.iter().map(|c| col(*c)))
        .collect();
    let folded = fold
        .call(args)
        .order_by(vec![col("_offset").sort(true, false)])
        .build()?
        .alias("records");
    let cutoff = inputs.cutoffs[&p];
    let df = ctx
        .read_table(Arc::new(table))?
        .filter(col("_offset").lt(lit(cutoff)))?
        .aggregate(vec![], vec![folded])?;
    Ok(Some(df))
}

/// Runs the fold and the merge on `ctx` and gathers what the version publishes.
pub async fn fold(
    ctx: &SessionContext,
    cfg: &Config,
    inputs: &Inputs,
    engine: &str,
) -> Result<Folded> {
    let started = Instant::now();
    let mut frames = Vec::new();
    let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let rules = cfg.validation.rules()?;
    for &p in inputs.segments.keys() {
        let params = FoldParams {
            partition: p,
            validation: cfg.validation.clone(),
            horizon_ms: cfg.dedupe_rule().horizon_ms,
            master: inputs.master.clone(),
            generation: inputs.generation.clone(),
        };
        match partition_frame(ctx, inputs, p, &params).await? {
            Some(df) => frames.push(df),
            // No raw rows below the cutoff: only the rollup prefix (if any) and the rule's
            // state, folded here.
            None => records.extend(records::of(PartitionFold::start(
                &inputs.master,
                inputs.generation.as_ref(),
                p,
                cfg.dedupe_rule(),
                &rules,
            )?)?),
        }
    }
    let scanned = frames.len();
    if let Some(all) = frames.into_iter().try_fold(None::<DataFrame>, |acc, df| {
        Ok::<_, datafusion::error::DataFusionError>(Some(match acc {
            None => df,
            Some(a) => a.union(df)?,
        }))
    })? {
        let merge = AggregateUDF::from(functions::Merge::new());
        let df = all
            .unnest_columns(&["records"])?
            .select(vec![
                get_field(col("records"), "key").alias("key"),
                get_field(col("records"), "value").alias("value"),
            ])?
            .aggregate(
                vec![col("key")],
                vec![merge.call(vec![col("value")]).alias("value")],
            )?;
        tracing::info!(
            engine,
            partitions = scanned,
            segments = inputs.total,
            "recompute plan submitted"
        );
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
            every.tick().await;
            loop {
                every.tick().await;
                tracing::info!(
                    elapsed_s = started.elapsed().as_secs(),
                    "recompute running on the engine"
                );
            }
        });
        let batches = df.collect().await;
        ticker.abort();
        for b in batches? {
            let (k, v) = (b.column(0), b.column(1));
            for i in 0..b.num_rows() {
                records.push((
                    functions::binary(k, i)?.to_vec(),
                    functions::binary(v, i)?.to_vec(),
                ));
            }
        }
    }
    tracing::info!(
        engine,
        records = records.len(),
        ms = started.elapsed().as_millis() as u64,
        "engine result received"
    );
    gather(inputs, records)
}

/// The records as a fold's result: entries in key order (values of one key merged), and per
/// partition its bookkeeping and dedupe state, each required exactly once.
fn gather(inputs: &Inputs, records: Vec<(Vec<u8>, Vec<u8>)>) -> Result<Folded> {
    let mut views: Vec<(ViewKey, Partial)> = Vec::new();
    let mut metas = BTreeMap::new();
    let mut pieces: BTreeMap<(Partition, u32), Vec<u8>> = BTreeMap::new();
    for (k, v) in records {
        let kind = k.first().copied();
        if kind != v.first().copied() {
            bail!("a record's key and value are of different kinds");
        }
        match kind {
            Some(records::VIEW) => views.push((records::view_key(&k)?, records::partial(&v)?)),
            Some(records::PART) => {
                let p = Partition::from_be_bytes(k[1..].try_into()?);
                if metas.insert(p, records::meta(&v)?).is_some() {
                    bail!("partition {p} was folded twice");
                }
            }
            Some(records::DEDUPE) => {
                let p = Partition::from_be_bytes(k[1..5].try_into()?);
                let n = u32::from_be_bytes(k[5..9].try_into()?);
                pieces.insert((p, n), v[1..].to_vec());
            }
            _ => bail!("a record of unknown kind {kind:?}"),
        }
    }
    views.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
    // Keys folded in this process (partitions with nothing to scan) may meet the engine's.
    let mut entries: Vec<(ViewKey, Partial)> = Vec::with_capacity(views.len());
    for (k, v) in views {
        match entries.last_mut() {
            Some((last, merged)) if *last == k => merged.merge(&v),
            _ => entries.push((k, v)),
        }
    }
    let mut folded = Folded {
        entries: vec![entries],
        events: 0,
        duplicates: 0,
        raw_rows: BTreeMap::new(),
        dedupe_states: BTreeMap::new(),
        dedupe_state_us: 0,
    };
    for &p in inputs.segments.keys() {
        let meta = metas
            .remove(&p)
            .ok_or_else(|| anyhow!("the engine's result lacks partition {p}"))?;
        folded.events += meta.events;
        folded.duplicates += meta.duplicates;
        folded.dedupe_state_us += meta.dedupe_state_us;
        for (t, n) in meta.raw_rows {
            *folded.raw_rows.entry(t).or_default() += n;
        }
        let mut state = Vec::new();
        for n in 0..meta.dedupe_pieces {
            let piece = pieces.remove(&(p, n)).ok_or_else(|| {
                anyhow!("the engine's result lacks piece {n} of partition {p}'s dedupe state")
            })?;
            state.extend_from_slice(&piece);
        }
        folded.dedupe_states.insert(p, state);
    }
    if let Some(p) = metas.keys().next() {
        bail!("the engine's result has partition {p}, which the master dataset does not");
    }
    Ok(folded)
}
