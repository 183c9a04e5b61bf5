//! `strata config` and configuration errors at start-up, through the real binary: defaults <
//! `--config` file < `STRATA__SECTION__KEY` variables < flags. Needs no broker.

use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The `strata` binary with no `STRATA_…` variables inherited from the test's environment.
fn strata(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("STRATA_") {
            cmd.env_remove(name);
        }
    }
    cmd.args(args).envs(env.iter().copied());
    cmd
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    strata(args, env).output().expect("run strata")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config file");
    path.to_str().expect("utf-8 temp path").to_string()
}

/// The child's exit status once it exits, or `None` (and the child killed) after `within`.
fn exit_within(child: &mut std::process::Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait for strata") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The lines of `section` (`""` for the top level) in a printed configuration.
fn section<'a>(printed: &'a str, name: &str) -> Vec<&'a str> {
    let mut current = "";
    printed
        .lines()
        .filter(|line| {
            if let Some(header) = line.strip_prefix('[') {
                current = header.trim_end_matches(']');
                return false;
            }
            current == name && !line.trim().is_empty()
        })
        .collect()
}

const FILE: &str = r#"
data-dir = "/from/file"

[kafka]
brokers = "file:9092"
topic = "file-topic"
group = "file-group"

[kafka.properties]
"security.protocol" = "PLAINTEXT"
"client.id" = "file-client"

[serve]
admin-key = "file-secret-key"
max-limit = 111
late-after-secs = 60
"#;

#[test]
fn print_shows_each_layer_overriding_the_one_before() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(dir.path(), "strata.toml", FILE);
    let out = run(
        &[
            "config",
            "--print",
            "--config",
            &file,
            "--topic",
            "flag-topic",
        ],
        &[
            ("STRATA__KAFKA__TOPIC", "env-topic"),
            ("STRATA__KAFKA__GROUP", "env-group"),
            ("STRATA__SERVE__MAX_LIMIT", "500"),
            ("STRATA__KAFKA__PROPERTIES__SECURITY_PROTOCOL", "SSL"),
        ],
    );
    let printed = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Default (no layer sets it) < file < env < flag.
    assert_eq!(
        section(&printed, ""),
        [
            "data-dir = \"/from/file\"",
            "min-free-mb = 256",
            "shutdown-timeout-secs = 10"
        ]
    );
    let kafka = section(&printed, "kafka");
    assert!(kafka.contains(&"partitions = 4"), "default: {printed}");
    assert!(
        kafka.contains(&"brokers = \"file:9092\""),
        "file: {printed}"
    );
    assert!(kafka.contains(&"group = \"env-group\""), "env: {printed}");
    assert!(kafka.contains(&"topic = \"flag-topic\""), "flag: {printed}");
    assert_eq!(
        section(&printed, "kafka.properties"),
        [
            "\"client.id\" = \"file-client\"",
            "\"security.protocol\" = \"SSL\""
        ],
        "{printed}"
    );
    let serve = section(&printed, "serve");
    assert!(serve.contains(&"max-limit = 500"), "env: {printed}");
    assert!(serve.contains(&"late-after-secs = 60"), "file: {printed}");
    assert!(
        serve.contains(&"silent-after-secs = 600"),
        "default: {printed}"
    );
    // The admin key is redacted.
    assert!(serve.contains(&"admin-key = \"<redacted>\""), "{printed}");
    assert!(!printed.contains("file-secret-key"), "{printed}");

    // The file through STRATA_CONFIG; a flag's own STRATA_ variable counts as the flag and beats
    // the STRATA__ form; a flag beats its STRATA_ variable.
    let out = run(
        &["config", "--http", "127.0.0.1:9999"],
        &[
            ("STRATA_CONFIG", file.as_str()),
            ("STRATA_BROKERS", "legacy:9092"),
            ("STRATA__KAFKA__BROKERS", "env:9092"),
            ("STRATA_HTTP", "127.0.0.1:7777"),
        ],
    );
    let printed = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let kafka = section(&printed, "kafka");
    assert!(kafka.contains(&"brokers = \"legacy:9092\""), "{printed}");
    assert!(kafka.contains(&"topic = \"file-topic\""), "{printed}");
    let serve = section(&printed, "serve");
    assert!(serve.contains(&"http = \"127.0.0.1:9999\""), "{printed}");
    assert!(serve.contains(&"max-limit = 111"), "{printed}");

    let out = run(&["config", "--check", "--config", &file], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn unknown_keys_stop_start_up_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = write(dir.path(), "bad.toml", "[serve]\nmax-limitt = 5\n");

    let out = run(&["config", "--check", "--config", &bad], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("serve.max-limitt"), "{stderr}");
    assert!(stderr.contains(&bad), "names the file: {stderr}");
    assert!(out.stdout.is_empty());

    let out = run(
        &["config", "--print"],
        &[("STRATA__SERVE__MAX_LIMITT", "5")],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("serve.max-limitt"), "{stderr}");
    assert!(stderr.contains("STRATA__SERVE__MAX_LIMITT"), "{stderr}");

    let out = run(&["config"], &[("STRATA__SERVE__MAX_LIMIT", "lots")]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("serve.max-limit"), "{stderr}");

    // A layer refuses to start with it too, before doing anything else.
    let data_dir = dir.path().join("data");
    let mut child = strata(
        &[
            "serve",
            "--config",
            &bad,
            "--http",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.to_str().expect("utf-8 temp path"),
        ],
        &[],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start strata serve");
    let Some(status) = exit_within(&mut child, Duration::from_secs(30)) else {
        panic!("strata serve started despite an unknown key");
    };
    let out = child.wait_with_output().expect("stderr");
    let stderr = text(&out.stderr);
    assert!(!status.success());
    assert!(stderr.contains("serve.max-limitt"), "{stderr}");
    assert!(!data_dir.exists(), "nothing was created");
}

/// The cluster keys: a bad value stops start-up naming the key, and `strata up`, which serves
/// its own speed layer, refuses the keys of a speed cluster.
#[test]
fn bad_cluster_settings_stop_start_up_naming_the_key() {
    for (var, value, key) in [
        ("STRATA__SPEED__HTTP", "nowhere", "speed.http"),
        (
            "STRATA__SPEED__ADVERTISE",
            "ftp://host:1",
            "speed.advertise",
        ),
        ("STRATA__SERVE__SPEED", "remote", "serve.speed"),
    ] {
        let out = run(&["config", "--check"], &[(var, value)]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{var}={value}: {stderr}");
        assert!(stderr.contains(key), "{var}={value} names {key}: {stderr}");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    for (var, value, key) in [
        ("STRATA__SERVE__SPEED", "cluster", "serve.speed"),
        ("STRATA__SPEED__HTTP", "127.0.0.1:7070", "speed.http"),
    ] {
        let out = run(
            &[
                "up",
                "--data-dir",
                data_dir.to_str().expect("utf-8 temp path"),
            ],
            &[(var, value)],
        );
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{var}={value}: {stderr}");
        assert!(stderr.contains(key), "{var}={value} names {key}: {stderr}");
        assert!(!data_dir.exists(), "nothing was created");
    }
}

/// SIGTERM while a layer is still waiting for the broker at start-up (nothing listens on its
/// address) stops it cleanly, exit 0, instead of the signal's default action killing it.
#[cfg(unix)]
#[test]
fn a_signal_during_start_up_stops_cleanly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let brokers = format!("127.0.0.1:{port}");
    for layer in ["batch", "speed", "up"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let mut args = vec![
            layer,
            "--brokers",
            &brokers,
            "--topic",
            "start-up",
            "--data-dir",
            data_dir.to_str().expect("utf-8 temp path"),
        ];
        if layer == "up" {
            args.extend(["--http", "127.0.0.1:0"]);
        }
        let mut child = strata(&args, &[("RUST_LOG", "info")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start strata");
        // Long enough for the runtime to be up and the first topic request to be refused.
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            child.try_wait().expect("wait").is_none(),
            "strata {layer} ended before the signal"
        );
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        let Some(status) = exit_within(&mut child, Duration::from_secs(20)) else {
            panic!("strata {layer} still running 20 s after SIGTERM");
        };
        let stderr = text(&child.wait_with_output().expect("stderr").stderr);
        assert_eq!(status.code(), Some(0), "strata {layer}: {status}; {stderr}");
        assert!(
            stderr.contains("stopped during start-up"),
            "strata {layer}: {stderr}"
        );
    }
}
