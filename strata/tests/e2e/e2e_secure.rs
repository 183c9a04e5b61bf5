//! Secured Kafka. This suite runs a broker of its own (Apache Kafka through `scripts/broker.sh`)
//! with a throwaway CA made here with `openssl`: besides its PLAINTEXT listener (kept for the
//! controller and the broker itself) it has a SASL_SSL listener with SCRAM-SHA-256 and an SSL
//! listener that requires a client certificate.
//!
//! - `strata up` and `strata generate` over SASL_SSL only: every merged answer equals the ground
//!   truth, before and after a batch run.
//! - `strata up` with a wrong password stops by itself, at once, with an error naming the broker
//!   and the mechanism, instead of retrying for minutes.
//! - `strata up` and `strata generate` over SSL with a client certificate: the answers are right.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::*;
use strata_common::time::now_millis;

const PASSWORD: &str = "strata-test-secret";
const STORE_PASSWORD: &str = "keystore-secret";

/// Where the files [`make_pki`] made are.
struct Pki {
    ca: PathBuf,
    keystore: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// A throwaway CA; the broker's key and certificate (for 127.0.0.1 and localhost) in a PKCS12
/// keystore; a client certificate and key in PEM.
fn make_pki(dir: &Path) -> Pki {
    make_ca(dir);
    sign_cert(
        dir,
        "broker",
        "localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    sign_cert(
        dir,
        "client",
        "strata-client",
        "extendedKeyUsage=clientAuth\n",
    );
    openssl(
        dir,
        &[
            "pkcs12",
            "-export",
            "-name",
            "broker",
            "-in",
            "broker.pem",
            "-inkey",
            "broker.key",
            "-certfile",
            "ca.pem",
            "-out",
            "broker.p12",
            "-passout",
            &format!("pass:{STORE_PASSWORD}"),
        ],
    );
    Pki {
        ca: dir.join("ca.pem"),
        keystore: dir.join("broker.p12"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The broker properties added to what `scripts/broker.sh` writes: the same PLAINTEXT and
/// CONTROLLER listeners (its placeholders stand for their ports) plus SASL_SSL and SSL.
fn broker_properties(pki: &Pki, sasl_port: u16, ssl_port: u16) -> String {
    let listeners = format!(
        "PLAINTEXT://127.0.0.1:@PORT@,CONTROLLER://127.0.0.1:@CONTROLLER_PORT@,\
         SASL_SSL://127.0.0.1:{sasl_port},SSL://127.0.0.1:{ssl_port}"
    );
    format!(
        "listeners={listeners}
advertised.listeners={listeners}
sasl.enabled.mechanisms=SCRAM-SHA-256
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location={keystore}
ssl.keystore.password={STORE_PASSWORD}
ssl.key.password={STORE_PASSWORD}
listener.name.ssl.ssl.client.auth=required
listener.name.ssl.ssl.truststore.type=PEM
listener.name.ssl.ssl.truststore.location={ca}
",
        keystore = path_str(&pki.keystore),
        ca = path_str(&pki.ca),
    )
}

/// A layer's shared flags against `brokers`, with librdkafka properties `kafka`.
fn secured_args(
    topic: &str,
    data_dir: &Path,
    brokers: &str,
    kafka: &[(&str, &str)],
) -> Vec<String> {
    let mut common = layer_args(topic, data_dir, 2000, None);
    set_brokers(&mut common, brokers);
    for (k, v) in kafka {
        common.extend(["--kafka".to_string(), format!("{k}={v}")]);
    }
    common
}

fn sasl_props<'a>(ca: &'a str, password: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "SCRAM-SHA-256"),
        ("sasl.username", "strata"),
        ("sasl.password", password),
        ("ssl.ca.location", ca),
    ]
}

/// Starts `strata up` and waits until it serves.
fn up(name: &str, common: &[String], log_dir: &Path) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut p = Proc::spawn(name, &up_args(common, &addr, ADMIN_KEY), log_dir);
    wait_for(
        &format!("{name} to listen"),
        Duration::from_secs(120),
        || {
            p.assert_running();
            std::net::TcpStream::connect(&addr).ok()
        },
    );
    wait_http(&addr);
    (p, addr)
}

#[test]
fn sasl_ssl_scram_and_ssl_client_certificates() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = make_pki(&dir.path().join("pki"));
    let (sasl_port, ssl_port) = (free_port(), free_port());
    let props = dir.path().join("secure.properties");
    std::fs::write(&props, broker_properties(&pki, sasl_port, ssl_port)).expect("properties");
    let scram = format!("SCRAM-SHA-256=[name=strata,password={PASSWORD}]");
    let _broker = Broker::start(
        &dir.path().join("broker"),
        &[
            ("STRATA_BROKER_PROPERTIES", path_str(&props)),
            ("STRATA_BROKER_SCRAM", &scram),
        ],
    );
    let sasl = format!("127.0.0.1:{sasl_port}");
    let ca = path_str(&pki.ca);
    let topic = unique_topic("e2e-secure");

    // A wrong password: `strata up` gives up by itself, with an error that says why and where.
    let wrong = secured_args(
        &topic,
        &dir.path().join("data-wrong"),
        &sasl,
        &sasl_props(ca, "not-the-password"),
    );
    let refused_at = Instant::now();
    let mut refused = Proc::spawn(
        "up-wrong-password",
        &up_args(&wrong, &format!("127.0.0.1:{}", free_port()), ADMIN_KEY),
        dir.path(),
    );
    let status = wait_for(
        "strata up with a wrong password to exit",
        Duration::from_secs(60),
        || refused.exit_status(),
    );
    let refused_after = refused_at.elapsed();
    assert!(!status.success(), "{status}; log: {}", refused.tail());
    let log = std::fs::read_to_string(&refused.log).unwrap_or_default();
    let error = log
        .lines()
        .find(|l| l.contains(&format!("authentication failed at {sasl}")))
        .unwrap_or_else(|| panic!("no authentication error in the log: {}", refused.tail()));
    assert!(error.contains("SCRAM-SHA-256"), "{error}");
    assert!(error.contains("SASL_SSL"), "{error}");
    assert!(
        !log.contains("not-the-password"),
        "the password is logged: {log}"
    );
    eprintln!(
        "wrong password: exited with {status} after {:.1}s: {error}",
        refused_after.as_secs_f64()
    );

    // A CA that did not sign the broker's certificate: the same, without a wait.
    let other = make_pki(&dir.path().join("other-pki"));
    let untrusted = secured_args(
        &topic,
        &dir.path().join("data-untrusted"),
        &sasl,
        &sasl_props(path_str(&other.ca), PASSWORD),
    );
    let untrusted_at = Instant::now();
    let mut distrust = Proc::spawn(
        "up-wrong-ca",
        &up_args(&untrusted, &format!("127.0.0.1:{}", free_port()), ADMIN_KEY),
        dir.path(),
    );
    let status = wait_for(
        "strata up with a CA that does not sign the broker's certificate to exit",
        Duration::from_secs(60),
        || distrust.exit_status(),
    );
    assert!(!status.success(), "{status}; log: {}", distrust.tail());
    let log = std::fs::read_to_string(&distrust.log).unwrap_or_default();
    let tls_error = log
        .lines()
        .find(|l| l.contains(&format!("authentication failed at {sasl}")))
        .unwrap_or_else(|| panic!("no TLS error in the log: {}", distrust.tail()));
    assert!(tls_error.contains("SSL"), "{tls_error}");
    eprintln!(
        "untrusted CA: exited with {status} after {:.1}s: {tls_error}",
        untrusted_at.elapsed().as_secs_f64()
    );

    // SASL_SSL with SCRAM-SHA-256, and nothing else: the answers are exact.
    let common = secured_args(
        &topic,
        &dir.path().join("data"),
        &sasl,
        &sasl_props(ca, PASSWORD),
    );
    let (mut layers, addr) = up("up-sasl-ssl", &common, dir.path());
    let now = now_millis();
    let mut truth = Truth::default();
    truth.produce(
        &common,
        gen_config(71, 20_000, now - 2 * 3_600_000, 3_600_000, false),
    );
    wait_speed_offsets(&addr, truth.messages);
    let before = truth.check(&addr);
    run_batch(&addr, ADMIN_KEY, 0);
    let after = truth.check(&addr) + truth.check_insights(&addr);
    layers.assert_running();
    layers.terminate();

    // SSL with a client certificate the broker requires.
    let key = path_str(&pki.client_key);
    let cert = path_str(&pki.client_cert);
    let ssl_topic = unique_topic("e2e-secure-ssl");
    let ssl_common = secured_args(
        &ssl_topic,
        &dir.path().join("data-ssl"),
        &format!("127.0.0.1:{ssl_port}"),
        &[
            ("security.protocol", "SSL"),
            ("ssl.ca.location", ca),
            ("ssl.certificate.location", cert),
            ("ssl.key.location", key),
        ],
    );
    let (mut ssl_layers, ssl_addr) = up("up-ssl", &ssl_common, dir.path());
    let mut ssl_truth = Truth::default();
    ssl_truth.produce(
        &ssl_common,
        gen_config(72, 2_000, now - 3_600_000, 3_600_000, false),
    );
    wait_speed_offsets(&ssl_addr, ssl_truth.messages);
    let ssl_checked = ssl_truth.check(&ssl_addr);
    ssl_layers.assert_running();
    ssl_layers.terminate();

    eprintln!(
        "e2e_secure: SASL_SSL/SCRAM-SHA-256: {} messages, {before} answers checked before the batch run and {after} after; wrong password refused in {:.1}s; SSL with a client certificate: {} messages, {ssl_checked} answers checked; {:.1}s",
        truth.messages,
        refused_after.as_secs_f64(),
        ssl_truth.messages,
        started.elapsed().as_secs_f64()
    );
}
