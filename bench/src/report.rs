//! The results file: every figure the run printed, the checks, and facts about the run.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

/// One `name value unit [run,run,...]` line as JSON; `None` for anything else.
fn figure(line: &str) -> Option<Value> {
    let mut parts = line.split_whitespace();
    let name = parts.next()?;
    let value: f64 = parts.next()?.parse().ok()?;
    let unit = parts.next()?;
    let mut v = json!({"name": name, "value": value, "unit": unit});
    if let Some(runs) = parts.next() {
        let runs: Vec<f64> = runs.split(',').filter_map(|r| r.parse().ok()).collect();
        v["runs"] = json!(runs);
    }
    Some(v)
}

/// One `check name ok|fail detail` line as JSON.
fn check(rest: &str) -> Option<Value> {
    let mut parts = rest.splitn(3, ' ');
    let name = parts.next()?;
    let outcome = parts.next()?;
    let detail = parts.next().unwrap_or("");
    Some(json!({"name": name, "ok": outcome == "ok", "detail": detail}))
}

pub fn write(lines: &Path, out: &Path, meta: &[(String, String)]) -> Result<()> {
    let text =
        std::fs::read_to_string(lines).with_context(|| format!("reading {}", lines.display()))?;
    let mut figures = Vec::new();
    let mut checks = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("check ") {
            checks.extend(check(rest));
        } else {
            figures.extend(figure(line));
        }
    }
    let meta: Map<String, Value> = meta
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
        .collect();
    let doc = json!({"meta": meta, "figures": figures, "checks": checks});
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let body = serde_json::to_string_pretty(&doc)?;
    std::fs::write(out, body + "\n").with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let f = figure("ingest.raw 123.5 msgs/s 1,2,3").expect("figure");
        assert_eq!(f["value"], json!(123.5));
        assert_eq!(f["runs"], json!([1.0, 2.0, 3.0]));
        assert!(figure("nonsense").is_none());
        let c = check("recovery.resumed ok first offsets 5").expect("check");
        assert_eq!(c["ok"], json!(true));
        assert_eq!(c["detail"], json!("first offsets 5"));
    }
}
