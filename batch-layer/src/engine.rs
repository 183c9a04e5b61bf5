//! A recompute on Apache DataFusion (`batch.engine` = `datafusion` or a Ballista scheduler's
//! `df://host:port`), run by the `strata-engine` process.
//!
//! The engine is a process of its own, so the `strata` binary does not carry DataFusion and
//! Ballista. It is handed the effective configuration in a file (keys and secrets left out),
//! logs to the same standard error, and prints the published version's manifest.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use strata_common::batch_store::{self, Manifest};
use strata_common::config::Config;

use crate::{Error, Result};

/// The `strata-engine` binary: `STRATA_ENGINE`, else the one beside this executable, else the
/// one on `PATH`.
fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("STRATA_ENGINE") {
        return PathBuf::from(p);
    }
    if let Some(beside) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("strata-engine")))
        .filter(|p| p.is_file())
    {
        return beside;
    }
    PathBuf::from("strata-engine")
}

fn failed(why: String) -> Error {
    Error::Common(strata_common::Error::Other(why))
}

/// Runs the recompute in `strata-engine` and returns the manifest it published.
pub fn recompute(cfg: &Config) -> Result<Manifest> {
    let mut handed = cfg.clone();
    handed.serve.admin_key = None;
    handed.serve.read_key = None;
    let text = toml::to_string(&handed).map_err(|e| {
        failed(format!(
            "cannot write the configuration for the engine: {e}"
        ))
    })?;
    let dir = batch_store::root(&cfg.data_dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join(format!(".engine-{}.toml", std::process::id()));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| Error::io(&path, e))?;
    let exe = binary();
    tracing::info!(engine = %cfg.batch.engine, binary = %exe.display(), "batch recompute handed to strata-engine");
    let out = Command::new(&exe)
        .arg("recompute")
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output();
    let _ = std::fs::remove_file(&path);
    let out = out.map_err(|e| {
        failed(format!(
            "batch.engine = {:?} needs the strata-engine binary; cannot run {}: {e}",
            cfg.batch.engine,
            exe.display()
        ))
    })?;
    if !out.status.success() {
        return Err(failed(format!(
            "strata-engine recompute ({}) failed: {}; the previous version stays served",
            cfg.batch.engine, out.status
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| {
        failed(format!(
            "strata-engine printed no manifest ({e}): {:?}",
            last.chars().take(200).collect::<String>()
        ))
    })
}
