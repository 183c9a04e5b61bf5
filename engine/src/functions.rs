//! Strata's views as DataFusion aggregate functions.
//!
//! - `strata_fold(params, _offset, id, ts, type, user, item, category, qty, price, rating, device,
//!   metric, value ORDER BY _offset)` folds one partition's rows. `params` is a JSON literal
//!   ([`FoldParams`]): the partition, the validation rules, the dedupe horizon and the rollup
//!   generation whose prefix comes first. Each row is validated as a message from Kafka is, so a
//!   file edited by hand cannot put an invalid event into a view. The result is a list of
//!   records `{key, value}` ([`records`]): every view's (key, partial) of that partition, the
//!   partition's bookkeeping, and the dedupe rule's state at its cutoff.
//! - `strata_merge(value)` merges the values of one key with the views' monoid
//!   ([`Partial::merge`]). Bookkeeping records are one per partition, so a second one of the
//!   same key is an error, not a sum.
//!
//! The fold needs its partition's rows in offset order and whole: it checks both, and fails
//! rather than fold rows out of order or merge two halves of one partition.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BinaryArray, ListArray, StructArray};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::datatypes::{
    DataType, Decimal128Type, Field, FieldRef, Fields, Float64Type, Int32Type, Int64Type,
    TimestampMillisecondType,
};
use datafusion::common::{exec_err, Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::AggregateOrderSensitivity;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};
use datafusion::physical_expr::expressions::Literal;
use serde::{Deserialize, Serialize};
use strata_batch::recompute::PartitionFold;
use strata_batch::retention::Generation;
use strata_common::dedupe::Dedupe;
use strata_common::event::{validate, Rules, Validation, Wire, WireTs};
use strata_common::handoff::Partition;
use strata_common::time::Millis;
use strata_common::views::{IdFold, Partial, ViewKey};

/// The fold's name in plans.
pub const FOLD: &str = "strata_fold";
/// The merge's name in plans.
pub const MERGE: &str = "strata_merge";

/// The fold's settings, passed in the plan as a JSON literal, so an executor needs no
/// configuration of its own.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FoldParams {
    pub partition: Partition,
    pub validation: Validation,
    pub horizon_ms: Millis,
    /// The master dataset's directory, where the rollup generation's prefix is read.
    pub master: PathBuf,
    pub generation: Option<Generation>,
}

/// Strata's two aggregate functions.
pub fn all() -> Vec<Arc<AggregateUDF>> {
    vec![
        Arc::new(AggregateUDF::from(Fold::new())),
        Arc::new(AggregateUDF::from(Merge::new())),
    ]
}

/// The records a fold yields and the merge groups. A key and a value both begin with a kind
/// byte, so the kinds never share a key.
pub mod records {
    use super::*;

    /// A view's key and partial (postcard).
    pub const VIEW: u8 = 0;
    /// A partition's bookkeeping: key the partition, value [`PartMeta`] (postcard).
    pub const PART: u8 = 1;
    /// A piece of a partition's dedupe state: key the partition and the piece's number.
    pub const DEDUPE: u8 = 2;

    /// Pieces of a dedupe state are at most this long, so no record outgrows a message.
    pub const PIECE: usize = 1 << 20;

    /// What one partition's fold counted.
    #[derive(Clone, Debug, Default, Serialize, Deserialize)]
    pub struct PartMeta {
        pub events: u64,
        pub duplicates: u64,
        pub raw_rows: BTreeMap<String, u64>,
        pub dedupe_state_us: u64,
        pub dedupe_pieces: u32,
    }

    pub fn tagged(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(body.len() + 1);
        v.push(kind);
        v.extend_from_slice(body);
        v
    }

    fn encode<T: Serialize>(kind: u8, t: &T) -> Result<Vec<u8>> {
        let mut v = vec![kind];
        postcard::to_io(t, &mut v)
            .map_err(|e| datafusion::error::DataFusionError::Execution(format!("encode: {e}")))?;
        Ok(v)
    }

    /// Every record of a finished partition fold.
    pub fn of(fold: PartitionFold) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let p = fold.partition;
        let (state, dedupe_state_us) = fold.dedupe_handover();
        let pieces: Vec<&[u8]> = state.chunks(PIECE).collect();
        let meta = PartMeta {
            events: fold.events,
            duplicates: fold.duplicates,
            raw_rows: fold.raw_rows,
            dedupe_state_us,
            dedupe_pieces: u32::try_from(pieces.len()).unwrap_or(u32::MAX),
        };
        let mut out = Vec::new();
        for chunk in IdFold::into_entries(vec![fold.views]) {
            for (k, v) in chunk {
                out.push((encode(VIEW, &k)?, encode(VIEW, &v)?));
            }
        }
        out.push((tagged(PART, &p.to_be_bytes()), encode(PART, &meta)?));
        for (n, piece) in pieces.into_iter().enumerate() {
            let mut key = vec![DEDUPE];
            key.extend_from_slice(&p.to_be_bytes());
            key.extend_from_slice(&(n as u32).to_be_bytes());
            out.push((key, tagged(DEDUPE, piece)));
        }
        Ok(out)
    }

    pub fn view_key(key: &[u8]) -> Result<ViewKey> {
        postcard::from_bytes(&key[1..])
            .map_err(|e| datafusion::error::DataFusionError::Execution(format!("a view key: {e}")))
    }

    pub fn partial(value: &[u8]) -> Result<Partial> {
        postcard::from_bytes(&value[1..]).map_err(|e| {
            datafusion::error::DataFusionError::Execution(format!("a view's partial: {e}"))
        })
    }

    pub fn meta(value: &[u8]) -> Result<PartMeta> {
        postcard::from_bytes(&value[1..]).map_err(|e| {
            datafusion::error::DataFusionError::Execution(format!("a partition's bookkeeping: {e}"))
        })
    }

    /// The type of a fold's result: a list of `{key, value}`.
    pub fn list_type() -> DataType {
        DataType::List(Arc::new(Field::new("item", struct_type(), false)))
    }

    pub fn struct_fields() -> Fields {
        Fields::from(vec![
            Field::new("key", DataType::Binary, false),
            Field::new("value", DataType::Binary, false),
        ])
    }

    fn struct_type() -> DataType {
        DataType::Struct(struct_fields())
    }

    /// Records as the fold's result value.
    pub fn to_scalar(rows: &[(Vec<u8>, Vec<u8>)]) -> ScalarValue {
        let keys = BinaryArray::from_iter_values(rows.iter().map(|r| r.0.as_slice()));
        let values = BinaryArray::from_iter_values(rows.iter().map(|r| r.1.as_slice()));
        let entries = StructArray::new(
            struct_fields(),
            vec![Arc::new(keys) as ArrayRef, Arc::new(values)],
            None,
        );
        let list = ListArray::new(
            Arc::new(Field::new("item", struct_type(), false)),
            OffsetBuffer::from_lengths([rows.len()]),
            Arc::new(entries),
            None,
        );
        ScalarValue::List(Arc::new(list))
    }
}

/// `strata_fold`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Fold {
    signature: Signature,
}

impl Fold {
    pub fn new() -> Self {
        Fold {
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

impl Default for Fold {
    fn default() -> Self {
        Fold::new()
    }
}

/// The columns the fold reads after `params`, in order.
pub const COLUMNS: [&str; 13] = [
    "_offset", "id", "ts", "type", "user", "item", "category", "qty", "price", "rating", "device",
    "metric", "value",
];

impl AggregateUDFImpl for Fold {
    fn name(&self) -> &str {
        FOLD
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(records::list_type())
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let params = args
            .exprs
            .first()
            .and_then(|e| e.as_ref().downcast_ref::<Literal>())
            .and_then(|l| match l.value() {
                ScalarValue::Utf8(Some(s))
                | ScalarValue::Utf8View(Some(s))
                | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
                _ => None,
            });
        let Some(params) = params else {
            return exec_err!(
                "{FOLD}: the first argument must be its parameters as a JSON string literal"
            );
        };
        let params: FoldParams = serde_json::from_str(&params).map_err(|e| {
            datafusion::error::DataFusionError::Execution(format!("{FOLD} parameters: {e}"))
        })?;
        let rules = params
            .validation
            .rules()
            .map_err(|e| datafusion::error::DataFusionError::Execution(format!("{FOLD}: {e}")))?;
        Ok(Box::new(FoldAcc {
            params,
            rules,
            fold: None,
            last_offset: None,
            done: None,
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[records]", args.name),
            DataType::Binary,
            true,
        ))])
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        AggregateOrderSensitivity::HardRequirement
    }
}

fn failed(what: String) -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::Execution(what)
}

struct FoldAcc {
    params: FoldParams,
    rules: Rules,
    /// Started at the first row (or at the end, for a partition with no rows).
    fold: Option<PartitionFold>,
    last_offset: Option<i64>,
    /// The records, once finished or received whole from another accumulator.
    done: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl std::fmt::Debug for FoldAcc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FoldAcc(p{})", self.params.partition)
    }
}

impl FoldAcc {
    fn fold(&mut self) -> Result<&mut PartitionFold> {
        if self.fold.is_none() {
            let p = &self.params;
            let fold = PartitionFold::start(
                &p.master,
                p.generation.as_ref(),
                p.partition,
                Dedupe::new(p.horizon_ms),
                &self.rules,
            )
            .map_err(|e| failed(format!("partition {}: {e}", p.partition)))?;
            self.fold = Some(fold);
        }
        self.fold
            .as_mut()
            .ok_or_else(|| failed("the fold was not started".into()))
    }

    fn finish(&mut self) -> Result<&Vec<(Vec<u8>, Vec<u8>)>> {
        if self.done.is_none() {
            self.fold()?;
            let fold = self
                .fold
                .take()
                .ok_or_else(|| failed("the fold was not started".into()))?;
            self.done = Some(records::of(fold)?);
        }
        self.done
            .as_ref()
            .ok_or_else(|| failed("the fold has no records".into()))
    }
}

/// Text columns as DataFusion may read them.
enum Texts<'a> {
    Utf8(&'a datafusion::arrow::array::StringArray),
    Large(&'a datafusion::arrow::array::LargeStringArray),
    View(&'a datafusion::arrow::array::StringViewArray),
}

impl Texts<'_> {
    fn of<'a>(a: &'a ArrayRef, name: &str) -> Result<Texts<'a>> {
        if let Some(a) = a.as_string_opt::<i32>() {
            Ok(Texts::Utf8(a))
        } else if let Some(a) = a.as_string_opt::<i64>() {
            Ok(Texts::Large(a))
        } else if let Some(a) = a.as_string_view_opt() {
            Ok(Texts::View(a))
        } else {
            exec_err!("{FOLD}: column {name} is {}, not text", a.data_type())
        }
    }

    fn get(&self, i: usize) -> Option<&str> {
        match self {
            Texts::Utf8(a) => a.is_valid(i).then(|| a.value(i)),
            Texts::Large(a) => a.is_valid(i).then(|| a.value(i)),
            Texts::View(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

/// A 64-bit integer column: plain, or a timestamp in milliseconds.
fn ints(a: &ArrayRef, name: &str) -> Result<Vec<Option<i64>>> {
    if let Some(a) = a.as_primitive_opt::<Int64Type>() {
        Ok(a.iter().collect())
    } else if let Some(a) = a.as_primitive_opt::<TimestampMillisecondType>() {
        Ok(a.iter().collect())
    } else {
        exec_err!(
            "{FOLD}: column {name} is {}, not a 64-bit integer",
            a.data_type()
        )
    }
}

/// Prices: exact decimals with six places (the millionths the views sum).
fn micros(a: &ArrayRef) -> Result<Vec<Option<i64>>> {
    match a.data_type() {
        DataType::Decimal128(_, 6) => {
            let a = a.as_primitive::<Decimal128Type>();
            Ok(a.iter()
                .map(|v| v.and_then(|v| i64::try_from(v).ok()))
                .collect())
        }
        DataType::Int64 => Ok(a.as_primitive::<Int64Type>().iter().collect()),
        t => exec_err!("{FOLD}: column price is {t}, not DECIMAL(18, 6)"),
    }
}

impl Accumulator for FoldAcc {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        if self.done.is_some() {
            return exec_err!(
                "{FOLD}: partition {} received rows after it was finished",
                self.params.partition
            );
        }
        if values.len() < 1 + COLUMNS.len() {
            return exec_err!(
                "{FOLD}: {} arguments, want {}",
                values.len(),
                1 + COLUMNS.len()
            );
        }
        let c = &values[1..];
        let offsets = ints(&c[0], "_offset")?;
        let ids = Texts::of(&c[1], "id")?;
        let ts = ints(&c[2], "ts")?;
        let kinds = Texts::of(&c[3], "type")?;
        let users = Texts::of(&c[4], "user")?;
        let items = Texts::of(&c[5], "item")?;
        let cats = Texts::of(&c[6], "category")?;
        let qtys = ints(&c[7], "qty")?;
        let prices = micros(&c[8])?;
        let ratings = c[9]
            .as_primitive_opt::<Int32Type>()
            .ok_or_else(|| failed(format!("{FOLD}: column rating is {}", c[9].data_type())))?;
        let devices = Texts::of(&c[10], "device")?;
        let metrics = Texts::of(&c[11], "metric")?;
        let readings = c[12]
            .as_primitive_opt::<Float64Type>()
            .ok_or_else(|| failed(format!("{FOLD}: column value is {}", c[12].data_type())))?;
        let p = self.params.partition;
        let mut last = self.last_offset;
        let rules = self.rules.clone();
        let fold = self.fold()?;
        let text = |t: &Texts, i| t.get(i).map(str::to_string);
        for i in 0..offsets.len() {
            let (Some(offset), Some(at)) = (offsets[i], ts[i]) else {
                return exec_err!("partition {p}: a row with no offset or time");
            };
            if last.is_some_and(|l| offset <= l) {
                return exec_err!(
                    "partition {p}: offset {offset} reached the fold after {}: rows out of offset order",
                    last.unwrap_or_default()
                );
            }
            last = Some(offset);
            let qty = qtys[i]
                .map(u32::try_from)
                .transpose()
                .map_err(|_| failed(format!("partition {p} offset {offset}: qty out of range")))?;
            let wire = Wire {
                id: text(&ids, i).unwrap_or_default(),
                ts: WireTs::Millis(at),
                kind: text(&kinds, i).unwrap_or_default(),
                user: text(&users, i),
                item: text(&items, i),
                category: text(&cats, i),
                qty,
                price: prices[i].map(|m| m as f64 / 1e6),
                rating: ratings.is_valid(i).then(|| i64::from(ratings.value(i))),
                device: text(&devices, i),
                metric: text(&metrics, i),
                value: readings.is_valid(i).then(|| readings.value(i)),
            };
            let event = validate(wire, None, &rules)
                .map_err(|r| failed(format!("partition {p} offset {offset}: {r}")))?;
            fold.add(&event);
        }
        self.last_offset = last;
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(records::to_scalar(self.finish()?))
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>()
            + self
                .done
                .as_ref()
                .map_or(0, |d| d.iter().map(|(k, v)| k.len() + v.len() + 48).sum())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let rows = self.finish()?;
        let bytes = postcard::to_stdvec(rows).map_err(|e| failed(format!("{FOLD} state: {e}")))?;
        Ok(vec![ScalarValue::Binary(Some(bytes))])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let Some(states) = states.first() else {
            return Ok(());
        };
        for i in 0..states.len() {
            if states.is_null(i) {
                continue;
            }
            let bytes = binary(states, i)?;
            if self.done.is_some() || self.fold.is_some() {
                return exec_err!(
                    "{FOLD}: partition {} was split between two folds; its rows must reach one fold whole and in offset order",
                    self.params.partition
                );
            }
            let rows: Vec<(Vec<u8>, Vec<u8>)> =
                postcard::from_bytes(bytes).map_err(|e| failed(format!("{FOLD} state: {e}")))?;
            self.done = Some(rows);
        }
        Ok(())
    }
}

/// Row `i` of a binary column, whichever binary type DataFusion gave it.
pub(crate) fn binary(a: &ArrayRef, i: usize) -> Result<&[u8]> {
    if let Some(a) = a.as_binary_opt::<i32>() {
        Ok(a.value(i))
    } else if let Some(a) = a.as_binary_opt::<i64>() {
        Ok(a.value(i))
    } else if let Some(a) = a.as_binary_view_opt() {
        Ok(a.value(i))
    } else {
        exec_err!("a column of {}, not binary", a.data_type())
    }
}

/// `strata_merge`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Merge {
    signature: Signature,
}

impl Merge {
    pub fn new() -> Self {
        Merge {
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

impl Default for Merge {
    fn default() -> Self {
        Merge::new()
    }
}

impl AggregateUDFImpl for Merge {
    fn name(&self) -> &str {
        MERGE
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Binary)
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(MergeAcc::default()))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}[value]", args.name),
            DataType::Binary,
            true,
        ))])
    }
}

/// One key's merge. A value seen once is kept as it came (most keys of a partitioned stream
/// come from one partition), and decoded only when a second one arrives.
#[derive(Debug, Default)]
struct MergeAcc {
    first: Option<Vec<u8>>,
    merged: Option<Partial>,
}

impl MergeAcc {
    fn add(&mut self, v: &[u8]) -> Result<()> {
        match v.first() {
            None => exec_err!("{MERGE}: an empty record"),
            Some(&records::VIEW) => {
                if let Some(m) = &mut self.merged {
                    m.merge(&records::partial(v)?);
                } else if let Some(first) = self.first.take() {
                    let mut m = records::partial(&first)?;
                    m.merge(&records::partial(v)?);
                    self.merged = Some(m);
                } else {
                    self.first = Some(v.to_vec());
                }
                Ok(())
            }
            Some(kind) => {
                if self.first.is_some() {
                    return exec_err!(
                        "{MERGE}: two records of kind {kind} for one key: a partition was folded twice"
                    );
                }
                self.first = Some(v.to_vec());
                Ok(())
            }
        }
    }

    fn value(&self) -> Result<Vec<u8>> {
        match (&self.merged, &self.first) {
            (Some(m), _) => {
                let mut v = vec![records::VIEW];
                postcard::to_io(m, &mut v).map_err(|e| failed(format!("{MERGE}: {e}")))?;
                Ok(v)
            }
            (None, Some(f)) => Ok(f.clone()),
            (None, None) => Ok(Vec::new()),
        }
    }
}

impl Accumulator for MergeAcc {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let Some(col) = values.first() else {
            return exec_err!("{MERGE} takes one argument");
        };
        for i in 0..col.len() {
            if !col.is_null(i) {
                self.add(binary(col, i)?)?;
            }
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Binary(Some(self.value()?)))
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.first.as_ref().map_or(0, Vec::len)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let v = self.value()?;
        Ok(vec![ScalarValue::Binary((!v.is_empty()).then_some(v))])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.update_batch(states)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{
        Decimal128Array, Float64Array, Int32Array, Int64Array, StringArray,
        TimestampMillisecondArray,
    };
    use strata_common::time::now_millis;
    use strata_common::views::ItemStats;

    fn acc(master: &std::path::Path, partition: Partition) -> FoldAcc {
        let params = FoldParams {
            partition,
            validation: Validation::default(),
            horizon_ms: 86_400_000,
            master: master.to_path_buf(),
            generation: None,
        };
        let rules = params.validation.rules().expect("rules");
        FoldAcc {
            params,
            rules,
            fold: None,
            last_offset: None,
            done: None,
        }
    }

    /// Views of `(offset, id, item)`, as DataFusion hands the fold its columns.
    fn views(rows: &[(i64, &str, &str)]) -> Vec<ArrayRef> {
        let n = rows.len();
        let ts = now_millis() - 60_000;
        let none = || Arc::new(StringArray::from(vec![None::<&str>; n])) as ArrayRef;
        vec![
            Arc::new(StringArray::from(vec!["{}"; n])),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(TimestampMillisecondArray::from(vec![ts; n]).with_timezone("UTC")),
            Arc::new(StringArray::from(vec!["view"; n])),
            Arc::new(StringArray::from(vec!["u1"; n])),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2))),
            none(),
            Arc::new(Int64Array::from(vec![None; n])),
            Arc::new(
                Decimal128Array::from(vec![None; n])
                    .with_precision_and_scale(18, 6)
                    .expect("decimal"),
            ),
            Arc::new(Int32Array::from(vec![None; n])),
            none(),
            none(),
            Arc::new(Float64Array::from(vec![None; n])),
        ]
    }

    fn records(acc: &mut FoldAcc) -> Vec<(Vec<u8>, Vec<u8>)> {
        acc.finish().expect("finish").clone()
    }

    fn item(records: &[(Vec<u8>, Vec<u8>)], name: &str) -> ItemStats {
        let want = ViewKey::Item(name.into());
        let (_, v) = records
            .iter()
            .find(|(k, _)| k[0] == records::VIEW && records::view_key(k).ok() == Some(want.clone()))
            .expect("the item's record");
        match records::partial(v).expect("a partial") {
            Partial::Item(s) => s,
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn a_row_at_or_below_the_last_offset_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = acc(dir.path(), 3);
        a.update_batch(&views(&[(5, "a", "i1"), (6, "b", "i1")]))
            .expect("in order");
        let e = a
            .update_batch(&views(&[(6, "c", "i1")]))
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("out of offset order") && e.contains("partition 3"),
            "{e}"
        );
    }

    #[test]
    fn the_fold_counts_an_id_once_and_the_merge_adds_partitions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = acc(dir.path(), 0);
        a.update_batch(&views(&[(1, "x", "i1"), (2, "x", "i1"), (3, "y", "i1")]))
            .expect("fold");
        let ra = records(&mut a);
        let meta = ra
            .iter()
            .find(|(k, _)| k[0] == records::PART)
            .map(|(_, v)| records::meta(v).expect("meta"))
            .expect("the partition's bookkeeping");
        // Naive: three rows, one of them a copy of "x".
        assert_eq!((meta.events, meta.duplicates), (2, 1));
        assert_eq!(meta.raw_rows.get("view"), Some(&3));
        assert_eq!(item(&ra, "i1").views, 2);

        let mut b = acc(dir.path(), 1);
        b.update_batch(&views(&[(1, "z", "i1")])).expect("fold");
        let rb = records(&mut b);
        let key = ra
            .iter()
            .find(|(k, v)| {
                k[0] == records::VIEW && matches!(records::partial(v), Ok(Partial::Item(_)))
            })
            .map(|(k, _)| k.clone())
            .expect("the item key");
        let value = |rs: &[(Vec<u8>, Vec<u8>)]| {
            rs.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone())
                .expect("a value")
        };
        let mut m = MergeAcc::default();
        m.add(&value(&ra)).expect("first");
        m.add(&value(&rb)).expect("second");
        match records::partial(&m.value().expect("merged")).expect("a partial") {
            Partial::Item(s) => assert_eq!(s.views, 3),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn the_merge_refuses_a_partition_folded_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut a = acc(dir.path(), 2);
        a.update_batch(&views(&[(1, "x", "i1")])).expect("fold");
        let ra = records(&mut a);
        let part = ra
            .iter()
            .find(|(k, _)| k[0] == records::PART)
            .map(|(_, v)| v.clone())
            .expect("bookkeeping");
        let mut m = MergeAcc::default();
        m.add(&part).expect("once");
        let e = m.add(&part).expect_err("twice").to_string();
        assert!(e.contains("folded twice"), "{e}");
    }
}
