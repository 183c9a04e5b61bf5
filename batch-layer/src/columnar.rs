//! The Parquet form of a master-dataset segment: one row per archived event, one column per
//! field of the wire form, so DuckDB, Spark or pandas read the dataset as it is:
//!
//! ```text
//! message strata_event {
//!   required int64 _offset;                         -- the Kafka offset
//!   required binary id (STRING);
//!   required int64 ts (TIMESTAMP(MILLIS, true));    -- event time
//!   required binary type (STRING);
//!   optional binary user (STRING); optional binary item (STRING); optional binary category (STRING);
//!   optional int64 qty; optional int64 price (DECIMAL(18, 6)); optional int32 rating;
//!   optional binary device (STRING); optional binary metric (STRING); optional double value;
//! }
//! ```
//!
//! Prices are stored as exact decimals (the millionths the views sum), so a query summing them
//! gets the same revenue to the last digit. Reading goes through the same validation as a
//! message from Kafka, so a file edited by hand cannot put an invalid event into a view.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{
    ByteArray, ByteArrayType, DataType, DoubleType, FixedLenByteArray, FixedLenByteArrayType,
    Int32Type, Int64Type,
};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, RowGroupReader};
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::file::writer::{SerializedFileWriter, SerializedRowGroupWriter};
use parquet::schema::parser::parse_message_type;
use strata_common::event::{validate, Event, Kind, Rules, Wire, WireTs};
use strata_common::handoff::Offset;
use strata_common::views::{DeviceStats, Rollup};

use crate::{Error, Result};

const SCHEMA: &str = "
message strata_event {
  required int64 _offset;
  required binary id (STRING);
  required int64 ts (TIMESTAMP(MILLIS, true));
  required binary type (STRING);
  optional binary user (STRING);
  optional binary item (STRING);
  optional binary category (STRING);
  optional int64 qty;
  optional int64 price (DECIMAL(18, 6));
  optional int32 rating;
  optional binary device (STRING);
  optional binary metric (STRING);
  optional double value;
}";

fn parquet_err(path: &Path, what: &str, e: parquet::errors::ParquetError) -> Error {
    Error::Dataset(format!("{}: {what}: {e}", path.display()))
}

/// One nullable column being filled: the values present and a definition level per row.
struct Col<T> {
    values: Vec<T>,
    defs: Vec<i16>,
}

impl<T> Col<T> {
    fn with_capacity(n: usize) -> Self {
        Col {
            values: Vec::with_capacity(n),
            defs: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, v: Option<T>) {
        match v {
            Some(v) => {
                self.values.push(v);
                self.defs.push(1);
            }
            None => self.defs.push(0),
        }
    }
}

fn bytes(s: &str) -> ByteArray {
    ByteArray::from(s.as_bytes().to_vec())
}

/// Every column of a segment, in schema order.
struct Columns {
    offset: Vec<i64>,
    id: Vec<ByteArray>,
    ts: Vec<i64>,
    kind: Vec<ByteArray>,
    user: Col<ByteArray>,
    item: Col<ByteArray>,
    category: Col<ByteArray>,
    qty: Col<i64>,
    price: Col<i64>,
    rating: Col<i32>,
    device: Col<ByteArray>,
    metric: Col<ByteArray>,
    value: Col<f64>,
}

impl Columns {
    fn of(events: &[(Offset, Event)]) -> Self {
        let n = events.len();
        let mut c = Columns {
            offset: Vec::with_capacity(n),
            id: Vec::with_capacity(n),
            ts: Vec::with_capacity(n),
            kind: Vec::with_capacity(n),
            user: Col::with_capacity(n),
            item: Col::with_capacity(n),
            category: Col::with_capacity(n),
            qty: Col::with_capacity(n),
            price: Col::with_capacity(n),
            rating: Col::with_capacity(n),
            device: Col::with_capacity(n),
            metric: Col::with_capacity(n),
            value: Col::with_capacity(n),
        };
        for (offset, e) in events {
            c.offset.push(*offset);
            c.id.push(bytes(&e.id));
            c.ts.push(e.ts);
            c.kind.push(bytes(e.type_name()));
            let (mut item, mut qty, mut price, mut rating) = (None, None, None, None);
            let (mut device, mut metric, mut value) = (None, None, None);
            match &e.kind {
                Kind::View(r) | Kind::AddToCart(r) => item = Some(r),
                Kind::Purchase {
                    item: r,
                    qty: q,
                    price_micros,
                } => {
                    item = Some(r);
                    qty = Some(i64::from(*q));
                    price = Some(*price_micros);
                }
                Kind::Rating { item: r, rating: x } => {
                    item = Some(r);
                    rating = Some(i32::from(*x));
                }
                Kind::Heartbeat { device: d } => device = Some(d.as_str()),
                Kind::Reading {
                    device: d,
                    metric: m,
                    value: v,
                } => {
                    device = Some(d.as_str());
                    metric = Some(m.as_str());
                    value = Some(*v);
                }
            }
            c.user.push(item.map(|r| bytes(&r.user)));
            c.item.push(item.map(|r| bytes(&r.item)));
            c.category
                .push(item.and_then(|r| r.category.as_deref()).map(bytes));
            c.qty.push(qty);
            c.price.push(price);
            c.rating.push(rating);
            c.device.push(device.map(bytes));
            c.metric.push(metric.map(bytes));
            c.value.push(value);
        }
        c
    }
}

fn write_column<T: DataType>(
    rg: &mut SerializedRowGroupWriter<'_, &File>,
    values: &[T::T],
    defs: Option<&[i16]>,
) -> parquet::errors::Result<()> {
    let Some(mut col) = rg.next_column()? else {
        return Err(parquet::errors::ParquetError::General(
            "the schema has fewer columns than written".into(),
        ));
    };
    col.typed::<T>().write_batch(values, defs, None)?;
    col.close()
}

/// A Parquet writer of `schema` (message type text) into `file`, Snappy-compressed.
fn writer<'a>(
    file: &'a File,
    schema: &str,
) -> parquet::errors::Result<SerializedFileWriter<&'a File>> {
    let schema = Arc::new(parse_message_type(schema)?);
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by(format!("strata {}", env!("CARGO_PKG_VERSION")))
        .build();
    SerializedFileWriter::new(file, schema, Arc::new(props))
}

/// Writes `events` as one Parquet file (one row group) to `file`.
pub fn write(file: &File, path: &Path, events: &[(Offset, Event)]) -> Result<()> {
    let err = |e| parquet_err(path, "write", e);
    let mut w = writer(file, SCHEMA).map_err(err)?;
    if !events.is_empty() {
        let c = Columns::of(events);
        let mut rg = w.next_row_group().map_err(err)?;
        (|| {
            write_column::<Int64Type>(&mut rg, &c.offset, None)?;
            write_column::<ByteArrayType>(&mut rg, &c.id, None)?;
            write_column::<Int64Type>(&mut rg, &c.ts, None)?;
            write_column::<ByteArrayType>(&mut rg, &c.kind, None)?;
            write_column::<ByteArrayType>(&mut rg, &c.user.values, Some(&c.user.defs))?;
            write_column::<ByteArrayType>(&mut rg, &c.item.values, Some(&c.item.defs))?;
            write_column::<ByteArrayType>(&mut rg, &c.category.values, Some(&c.category.defs))?;
            write_column::<Int64Type>(&mut rg, &c.qty.values, Some(&c.qty.defs))?;
            write_column::<Int64Type>(&mut rg, &c.price.values, Some(&c.price.defs))?;
            write_column::<Int32Type>(&mut rg, &c.rating.values, Some(&c.rating.defs))?;
            write_column::<ByteArrayType>(&mut rg, &c.device.values, Some(&c.device.defs))?;
            write_column::<ByteArrayType>(&mut rg, &c.metric.values, Some(&c.metric.defs))?;
            write_column::<DoubleType>(&mut rg, &c.value.values, Some(&c.value.defs))
        })()
        .map_err(err)?;
        rg.close().map_err(err)?;
    }
    w.close().map_err(err)?;
    Ok(())
}

/// Reads one column of a row group as one optional value per row; a column the file does not
/// have reads as all missing.
fn read_column<T: DataType>(
    rg: &dyn RowGroupReader,
    index: Option<usize>,
    rows: usize,
    path: &Path,
    name: &str,
) -> Result<Vec<Option<T::T>>> {
    let Some(i) = index else {
        return Ok((0..rows).map(|_| None).collect());
    };
    let err = |e| parquet_err(path, &format!("column {name}"), e);
    let max_def = rg.metadata().column(i).column_descr().max_def_level();
    let mut reader =
        T::get_column_reader(rg.get_column_reader(i).map_err(err)?).ok_or_else(|| {
            Error::Dataset(format!(
                "{}: column {name} has another type",
                path.display()
            ))
        })?;
    let (mut values, mut defs) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
    let mut read = 0;
    while read < rows {
        let (records, _, _) = reader
            .read_records(rows - read, Some(&mut defs), None, &mut values)
            .map_err(err)?;
        if records == 0 {
            break;
        }
        read += records;
    }
    if read != rows {
        return Err(Error::Dataset(format!(
            "{}: column {name} has {read} of {rows} rows",
            path.display()
        )));
    }
    if max_def == 0 {
        return Ok(values.into_iter().map(Some).collect());
    }
    let mut present = values.into_iter();
    Ok(defs
        .iter()
        .map(|&d| if d == max_def { present.next() } else { None })
        .collect())
}

fn text(v: Option<ByteArray>, path: &Path, name: &str) -> Result<Option<String>> {
    v.map(|b| {
        String::from_utf8(b.data().to_vec()).map_err(|_| {
            Error::Dataset(format!(
                "{}: column {name} holds invalid UTF-8",
                path.display()
            ))
        })
    })
    .transpose()
}

/// Moves one row's value out of a column read by [`read_column`].
fn take<T>(col: &mut [Option<T>], row: usize) -> Option<T> {
    col.get_mut(row).and_then(Option::take)
}

fn copied<T: Copy>(col: &[Option<T>], row: usize) -> Option<T> {
    col.get(row).copied().flatten()
}

/// Reads the events of a Parquet segment with offsets below `below`, in file order, each
/// validated again by `rules`.
pub fn read(path: &Path, below: Offset, rules: &Rules) -> Result<Vec<(Offset, Event)>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| parquet_err(path, "open", e))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let index = |name: &str| schema.columns().iter().position(|c| c.name() == name);
    let need = |name: &str| {
        index(name).ok_or_else(|| Error::Dataset(format!("{}: no column {name}", path.display())))
    };
    let (i_offset, i_id, i_ts, i_type) =
        (need("_offset")?, need("id")?, need("ts")?, need("type")?);
    let mut out = Vec::new();
    for g in 0..reader.num_row_groups() {
        let rg = reader
            .get_row_group(g)
            .map_err(|e| parquet_err(path, "row group", e))?;
        let rows = usize::try_from(rg.metadata().num_rows()).unwrap_or(0);
        let rg = rg.as_ref();
        let offsets = read_column::<Int64Type>(rg, Some(i_offset), rows, path, "_offset")?;
        let ts = read_column::<Int64Type>(rg, Some(i_ts), rows, path, "ts")?;
        let mut ids = read_column::<ByteArrayType>(rg, Some(i_id), rows, path, "id")?;
        let mut kinds = read_column::<ByteArrayType>(rg, Some(i_type), rows, path, "type")?;
        let mut users = read_column::<ByteArrayType>(rg, index("user"), rows, path, "user")?;
        let mut items = read_column::<ByteArrayType>(rg, index("item"), rows, path, "item")?;
        let mut cats = read_column::<ByteArrayType>(rg, index("category"), rows, path, "category")?;
        let qtys = read_column::<Int64Type>(rg, index("qty"), rows, path, "qty")?;
        let prices = read_column::<Int64Type>(rg, index("price"), rows, path, "price")?;
        let ratings = read_column::<Int32Type>(rg, index("rating"), rows, path, "rating")?;
        let mut devices = read_column::<ByteArrayType>(rg, index("device"), rows, path, "device")?;
        let mut metrics = read_column::<ByteArrayType>(rg, index("metric"), rows, path, "metric")?;
        let values = read_column::<DoubleType>(rg, index("value"), rows, path, "value")?;
        for row in 0..rows {
            let name = |col: &mut [Option<ByteArray>], what| text(take(col, row), path, what);
            let (qty, price, rating, value) = (
                copied(&qtys, row),
                copied(&prices, row),
                copied(&ratings, row),
                copied(&values, row),
            );
            let at = || format!("{} row {}", path.display(), row + 1);
            let (Some(offset), Some(ts)) = (copied(&offsets, row), copied(&ts, row)) else {
                return Err(Error::Dataset(format!("{}: no offset or time", at())));
            };
            if offset >= below {
                return Ok(out);
            }
            let qty = qty
                .map(u32::try_from)
                .transpose()
                .map_err(|_| Error::Dataset(format!("{}: qty out of range", at())))?;
            let wire = Wire {
                id: name(&mut ids, "id")?.unwrap_or_default(),
                ts: WireTs::Millis(ts),
                kind: name(&mut kinds, "type")?.unwrap_or_default(),
                user: name(&mut users, "user")?,
                item: name(&mut items, "item")?,
                category: name(&mut cats, "category")?,
                qty,
                price: price.map(|micros| micros as f64 / 1e6),
                rating: rating.map(i64::from),
                device: name(&mut devices, "device")?,
                metric: name(&mut metrics, "metric")?,
                value,
            };
            let event = validate(wire, None, rules)
                .map_err(|r| Error::Dataset(format!("{}: {r}", at())))?;
            out.push((offset, event));
        }
    }
    Ok(out)
}

/// The Parquet form of rollup records ([`strata_common::views::Rollup`]): one row per device
/// (and metric, for readings) and hour. Sums are exact decimals of the millionths the views add.
const ROLLUP_SCHEMA: &str = "
message strata_rollup {
  required binary device (STRING);
  optional binary metric (STRING);
  required int64 hour (TIMESTAMP(MILLIS, true));
  required int64 count;
  required int64 last_seen (TIMESTAMP(MILLIS, true));
  optional double min;
  optional double max;
  optional fixed_len_byte_array(16) sum (DECIMAL(38, 6));
}";

/// Writes rollup records as one Parquet file to `file`.
pub fn write_rollups(file: &File, path: &Path, records: &[Rollup]) -> Result<()> {
    let err = |e| parquet_err(path, "write", e);
    let mut w = writer(file, ROLLUP_SCHEMA).map_err(err)?;
    if !records.is_empty() {
        let n = records.len();
        let mut device = Vec::with_capacity(n);
        let mut metric = Col::with_capacity(n);
        let (mut hour, mut count, mut last_seen) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut min, mut max, mut sum) = (
            Col::with_capacity(n),
            Col::with_capacity(n),
            Col::with_capacity(n),
        );
        for r in records {
            device.push(bytes(&r.device));
            metric.push(r.metric.as_deref().map(bytes));
            hour.push(r.hour);
            count.push(i64::try_from(r.events()).unwrap_or(i64::MAX));
            last_seen.push(r.stats.last_seen.unwrap_or(r.hour));
            min.push(r.stats.min);
            max.push(r.stats.max);
            sum.push(
                r.metric
                    .as_ref()
                    .map(|_| FixedLenByteArray::from(r.stats.sum_micros.to_be_bytes().to_vec())),
            );
        }
        let mut rg = w.next_row_group().map_err(err)?;
        (|| {
            write_column::<ByteArrayType>(&mut rg, &device, None)?;
            write_column::<ByteArrayType>(&mut rg, &metric.values, Some(&metric.defs))?;
            write_column::<Int64Type>(&mut rg, &hour, None)?;
            write_column::<Int64Type>(&mut rg, &count, None)?;
            write_column::<Int64Type>(&mut rg, &last_seen, None)?;
            write_column::<DoubleType>(&mut rg, &min.values, Some(&min.defs))?;
            write_column::<DoubleType>(&mut rg, &max.values, Some(&max.defs))?;
            write_column::<FixedLenByteArrayType>(&mut rg, &sum.values, Some(&sum.defs))
        })()
        .map_err(err)?;
        rg.close().map_err(err)?;
    }
    w.close().map_err(err)?;
    Ok(())
}

/// Reads the rollup records of a file [`write_rollups`] wrote.
pub fn read_rollups(path: &Path) -> Result<Vec<Rollup>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| parquet_err(path, "open", e))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let index = |name: &str| schema.columns().iter().position(|c| c.name() == name);
    let mut out = Vec::new();
    for g in 0..reader.num_row_groups() {
        let rg = reader
            .get_row_group(g)
            .map_err(|e| parquet_err(path, "row group", e))?;
        let rows = usize::try_from(rg.metadata().num_rows()).unwrap_or(0);
        let rg = rg.as_ref();
        let mut devices = read_column::<ByteArrayType>(rg, index("device"), rows, path, "device")?;
        let mut metrics = read_column::<ByteArrayType>(rg, index("metric"), rows, path, "metric")?;
        let hours = read_column::<Int64Type>(rg, index("hour"), rows, path, "hour")?;
        let counts = read_column::<Int64Type>(rg, index("count"), rows, path, "count")?;
        let seen = read_column::<Int64Type>(rg, index("last_seen"), rows, path, "last_seen")?;
        let mins = read_column::<DoubleType>(rg, index("min"), rows, path, "min")?;
        let maxs = read_column::<DoubleType>(rg, index("max"), rows, path, "max")?;
        let sums = read_column::<FixedLenByteArrayType>(rg, index("sum"), rows, path, "sum")?;
        for row in 0..rows {
            let at = || format!("{} row {}", path.display(), row + 1);
            let device = text(take(&mut devices, row), path, "device")?
                .ok_or_else(|| Error::Dataset(format!("{}: no device", at())))?;
            let metric = text(take(&mut metrics, row), path, "metric")?;
            let (Some(hour), Some(count), Some(last_seen)) = (
                copied(&hours, row),
                copied(&counts, row).and_then(|c| u64::try_from(c).ok()),
                copied(&seen, row),
            ) else {
                return Err(Error::Dataset(format!(
                    "{}: no hour, count or last_seen",
                    at()
                )));
            };
            let mut stats = DeviceStats {
                last_seen: Some(last_seen),
                ..Default::default()
            };
            if metric.is_some() {
                let sum = sums
                    .get(row)
                    .and_then(Option::as_ref)
                    .and_then(|b| <[u8; 16]>::try_from(b.data()).ok())
                    .ok_or_else(|| Error::Dataset(format!("{}: no sum", at())))?;
                stats.readings = count;
                stats.min = copied(&mins, row);
                stats.max = copied(&maxs, row);
                stats.sum_micros = i128::from_be_bytes(sum);
            } else {
                stats.heartbeats = count;
            }
            out.push(Rollup {
                device: device.into(),
                metric: metric.map(Into::into),
                hour,
                stats,
            });
        }
    }
    Ok(out)
}
