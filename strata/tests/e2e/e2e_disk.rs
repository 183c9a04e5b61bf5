//! Disk trouble: the data directory fills up while the layers run, then the writers are started
//! on a read-only view of it. The layers that write stop with an error naming the cause and the
//! path; what they stored stays intact (the serving layer keeps answering, and `strata verify`
//! finds its answers equal to a recomputation); once space or write access returns, the restarted
//! layers resume and nothing is lost or counted twice.
//!
//! The data directory is a small tmpfs mounted by the test (the read-only view a read-only bind
//! mount of it), so it needs the right to mount (root, as in CI); without it the test fails,
//! saying so: a check that cannot run is not a check that passed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;
use strata_common::time::now_millis;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size_mb: u32) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.success() => Tmpfs(path.to_path_buf()),
            Ok(o) => panic!(
                "e2e_disk needs to mount a tmpfs (run it as root, as CI does): mount said {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("e2e_disk needs the mount command: {e}"),
        }
    }

    /// A read-only view of the same file system at `path`.
    fn read_only_view(&self, path: &Path) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let run = |args: &[&str]| {
            let st = Command::new("mount").args(args).status().expect("mount");
            assert!(st.success(), "mount {args:?}");
        };
        let (from, to) = (self.0.to_string_lossy(), path.to_string_lossy());
        run(&["--bind", &from, &to]);
        run(&["-o", "remount,ro,bind", &to]);
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A file that fills the file system holding the data directory, as a disk filling up from
/// outside would, and keeps it full: a process that stops releases the space it held (RocksDB
/// preallocates the files it writes, and a file deleted while open is freed only at close), and
/// a disk that others fill does not stay free for the layers still running.
struct Filler {
    dir: PathBuf,
    path: PathBuf,
    file: std::fs::File,
    /// Bytes left free; 0: to the last byte.
    leave: u64,
}

impl Filler {
    fn new(dir: &Path, leave: u64) -> Filler {
        let path = dir.join("filler");
        let file = std::fs::File::create(&path).expect("filler");
        let mut f = Filler {
            dir: dir.to_path_buf(),
            path,
            file,
            leave,
        };
        f.top_up();
        f
    }

    /// Writes until only `leave` bytes are free (or none, at `leave` 0).
    fn top_up(&mut self) {
        let chunk = vec![0u8; 1 << 20];
        while strata_common::disk::space(&self.dir)
            .expect("free space")
            .free_bytes
            > self.leave + chunk.len() as u64
        {
            // The layers write too: the disk can fill before the check above sees it.
            match self
                .file
                .write_all(&chunk)
                .and_then(|()| self.file.sync_all())
            {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => return,
                Err(e) => panic!("fill: {e}"),
            }
        }
        if self.leave == 0 {
            let small = [0u8; 4096];
            while self
                .file
                .write_all(&small)
                .and_then(|()| self.file.sync_all())
                .is_ok()
            {}
        }
    }

    fn remove(self) {
        std::fs::remove_file(&self.path).expect("free the space");
    }
}

/// Waits up to 90 s for a layer to stop by itself, any way but a clean exit, keeping the disk
/// full meanwhile when `disk` is given.
fn wait_stopped(p: &mut Proc, mut disk: Option<&mut Filler>) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(d) = disk.as_deref_mut() {
            d.top_up();
        }
        if let Some(status) = p.exit_status() {
            assert!(!status.success(), "{} exited cleanly: {}", p.name, p.tail());
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not stop: {}",
            p.name,
            p.tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for a layer to stop on a full disk (any way but a clean exit); returns how, with the
/// last lines of its log.
fn stops(p: &mut Proc, disk: &mut Filler) -> String {
    let status = wait_stopped(p, Some(disk));
    format!("{status}: {}", p.tail())
}

/// Waits for a layer to stop by itself, with an error that says why.
fn stops_with(p: &mut Proc, cause: &str, disk: Option<&mut Filler>) -> String {
    wait_stopped(p, disk);
    let log = std::fs::read_to_string(&p.log).unwrap_or_default();
    let line = log
        .lines()
        .rev()
        .find(|l| l.starts_with("error: ") && l.contains(cause))
        .unwrap_or_else(|| {
            panic!(
                "{} stopped without an error naming {cause:?}: {}",
                p.name,
                p.tail()
            )
        });
    line.to_string()
}

#[test]
fn a_full_or_read_only_data_directory_stops_the_writers_and_loses_nothing() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let fs = Tmpfs::mount(&data_dir, 192);
    let topic = unique_topic("e2e-disk");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut common = layer_args(&topic, &data_dir, 2000, Some(&addr));
    common.extend(["--admin-key".to_string(), ADMIN_KEY.to_string()]);
    common.extend(["--min-free-mb".to_string(), "16".to_string()]);
    let with = |cmd: &str, data: &Path, extra: &[&str]| -> Vec<String> {
        let mut v = vec![cmd.to_string()];
        v.extend_from_slice(&common);
        let at = v
            .iter()
            .position(|a| a == "--data-dir")
            .expect("--data-dir");
        v[at + 1] = data.to_string_lossy().into_owned();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("logs");
    // `reserve`: the free-space check's `--min-free-mb` (0: off).
    let writers_with = |round: u32, data: &Path, reserve: &str| -> [Proc; 2] {
        let set = |mut v: Vec<String>| {
            let at = v
                .iter()
                .position(|a| a == "--min-free-mb")
                .expect("--min-free-mb");
            v[at + 1] = reserve.to_string();
            v
        };
        [
            Proc::spawn(
                &format!("speed{round}"),
                &set(with("speed", data, &[])),
                &logs,
            ),
            Proc::spawn(
                &format!("batch{round}"),
                &set(with("batch", data, &["--every", "2s"])),
                &logs,
            ),
        ]
    };
    let writers = |round: u32, data: &Path| writers_with(round, data, "16");

    let now = now_millis();
    let mut truth = Truth::default();
    truth.produce(
        &common,
        gen_config(41, 20_000, now - 3 * 3_600_000, 3_600_000, false),
    );
    let mut w = writers(1, &data_dir);
    let mut serve = Proc::spawn("serve", &with("serve", &data_dir, &[]), &logs);
    wait_http(&addr);
    wait_speed_offsets(&addr, truth.messages);
    truth.check(&addr);

    // The disk fills up while events arrive.
    let mut filler = Filler::new(&data_dir, 4 << 20);
    truth.produce(
        &common,
        gen_config(42, 10_000, now - 2 * 3_600_000, 3_600_000, false),
    );
    let full = [
        stops_with(&mut w[0], "No space left on device", Some(&mut filler)),
        stops_with(&mut w[1], "No space left on device", Some(&mut filler)),
    ];
    serve.assert_running();
    let (code, out) = verify(&common, &addr, false, &[]);
    assert_eq!(
        code, 0,
        "what was stored before the disk filled is intact:\n{out}"
    );
    filler.remove();
    let mut w = writers(2, &data_dir);
    wait_speed_offsets(&addr, truth.messages);
    truth.check(&addr);

    // A real ENOSPC: the reserve off and the disk filled to its last byte while events arrive,
    // so that a RocksDB or Parquet write itself fails. Each writer stops (with an error, or
    // by an abort inside RocksDB); the stored state stays intact and a restart loses nothing.
    for p in w.iter_mut() {
        p.terminate();
    }
    let mut w = writers_with(5, &data_dir, "0");
    wait_speed_offsets(&addr, truth.messages);
    let mut filler = Filler::new(&data_dir, 0);
    truth.produce(
        &common,
        gen_config(44, 10_000, now - 2 * 3_600_000, 3_600_000, false),
    );
    let enospc = [stops(&mut w[0], &mut filler), stops(&mut w[1], &mut filler)];
    serve.assert_running();
    let (code, out) = verify(&common, &addr, false, &[]);
    assert_eq!(code, 0, "the stored state is intact after ENOSPC:\n{out}");
    filler.remove();
    let mut w = writers(6, &data_dir);
    wait_speed_offsets(&addr, truth.messages);
    truth.check(&addr);

    // The writers stop cleanly and are started again on a read-only view of the directory.
    for p in w.iter_mut() {
        p.terminate();
    }
    let ro_dir = dir.path().join("data-ro");
    let ro = fs.read_only_view(&ro_dir);
    truth.produce(
        &common,
        gen_config(43, 10_000, now - 3_600_000, 3_600_000, false),
    );
    let mut w = writers(3, &ro_dir);
    let read_only = [
        stops_with(&mut w[0], "Read-only file system", None),
        stops_with(&mut w[1], "Read-only file system", None),
    ];
    serve.assert_running();
    let (code, out) = verify(&common, &addr, false, &[]);
    assert_eq!(code, 0, "the stored state is intact:\n{out}");
    drop(ro);
    let mut w = writers(4, &data_dir);
    wait_speed_offsets(&addr, truth.messages);
    let checked = truth.check(&addr) + truth.check_insights(&addr);
    let (code, out) = verify(&common, &addr, true, &[]);
    assert_eq!(code, 0, "verify after recovery:\n{out}");
    let (_, st) = get_json(&addr, "/v1/status");
    let ev = &st["speed"]["events"];
    assert_eq!(ev["duplicates"].as_u64(), Some(truth.copies), "{st}");
    assert_eq!(ev["rejected"].as_u64(), Some(truth.malformed), "{st}");
    for p in w.iter_mut() {
        p.assert_running();
    }
    serve.assert_running();
    eprintln!("disk full: {}\n           {}", full[0], full[1]);
    eprintln!("read-only: {}\n           {}", read_only[0], read_only[1]);
    eprintln!("ENOSPC:\n{}\n{}", enospc[0], enospc[1]);
    eprintln!("{}", verify_summary(&out));
    eprintln!(
        "e2e_disk: {} messages, {checked} answers checked after recovery, {:.1}s",
        truth.messages,
        started.elapsed().as_secs_f64()
    );
}
