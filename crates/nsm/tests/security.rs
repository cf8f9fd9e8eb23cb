//! Security as an operator meets it, with the real nsm binary: Kafka secrets from the
//! environment and from files never appear in anything nsm prints.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use rdkafka::mocking::MockCluster;

/// Secret values unique to one test run, so a match in a log can only be a leak.
struct Secrets {
    from_env: String,
    from_file: String,
    literal: String,
}

impl Secrets {
    fn new() -> Secrets {
        let run = format!("{}-{}", std::process::id(), now_ms());
        Secrets {
            from_env: format!("env-secret-{run}"),
            from_file: format!("file-secret-{run}"),
            literal: format!("literal-secret-{run}"),
        }
    }

    fn assert_absent(&self, what: &str, text: &str) {
        for secret in [&self.from_env, &self.from_file, &self.literal] {
            assert!(
                !text.contains(secret.as_str()),
                "{what} shows the secret {secret:?}:\n{text}"
            );
        }
    }
}

const PASSWORD_VARIABLE: &str = "NSM_TEST_KAFKA_PASSWORD";

/// The test config with SASL settings and three secrets: one from the environment, one
/// from a file, one written in the config under a name that says it is secret.
fn config_with_secrets(
    brokers: &str,
    dir: &Path,
    port: u16,
    secret_file: &Path,
    secrets: &Secrets,
) -> String {
    test_config(brokers, "events", &dir.join("state"), port, "nsm-secrets").replace(
        "[kafka.properties]\n",
        &format!(
            "[kafka.properties]\n\
             \"sasl.username\" = \"nsm\"\n\
             \"sasl.password\" = \"${{{PASSWORD_VARIABLE}}}\"\n\
             \"ssl.key.password\" = \"${{file:{file}}}\"\n\
             \"sasl.oauthbearer.config\" = \"principal=nsm extension_token={literal}\"\n\
             # Every librdkafka debug context: whatever librdkafka logs, nsm logs at debug.\n\
             \"debug\" = \"all\"\n",
            file = secret_file.display(),
            literal = secrets.literal,
        ),
    )
}

#[test]
fn kafka_secrets_from_the_environment_and_files_never_appear_in_logs_or_errors() {
    let secrets = Secrets::new();
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("events", 2, 1).expect("topic");
    cluster.create_topic("events-dlq", 1, 1).expect("dlq topic");
    // The mock cluster cannot create topics through the admin API.
    cluster
        .create_topic("nsm-secrets-changelog", 2, 1)
        .expect("changelog topic");
    let brokers = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("tempdir");

    let stream = known_stream(20, 2);
    let events_file = dir.path().join("events.jsonl");
    std::fs::write(&events_file, stream.lines.join("\n")).expect("write events");
    nsm_tool(&[
        "produce",
        "--brokers",
        &brokers,
        "--topic",
        "events",
        "--file",
        events_file.to_str().expect("utf8"),
        "--key-field",
        "user_id",
    ]);

    let secret_file = dir.path().join("kafka-key-password");
    // A trailing newline, as `echo secret > file` writes it: not part of the secret.
    std::fs::write(&secret_file, format!("{}\n", secrets.from_file)).expect("secret file");
    let port = free_port();
    let config_path = dir.path().join("nsm.toml");
    std::fs::write(
        &config_path,
        config_with_secrets(&brokers, dir.path(), port, &secret_file, &secrets),
    )
    .expect("config");
    let config = config_path.to_str().expect("utf8");

    // `nsm check` prints a summary of the config.
    let check = Command::new(NSM)
        .args(["check", "--config", config])
        .env(PASSWORD_VARIABLE, &secrets.from_env)
        .output()
        .expect("nsm check");
    let check_output = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "{check_output}");
    secrets.assert_absent("nsm check", &check_output);

    // A whole run, logging at debug with every librdkafka debug context: the consumer, the
    // dead-letter producer and the admin client all start with the secrets.
    let mut nsm = Process::spawn(
        "nsm",
        Command::new(NSM)
            .args(["run", "--config", config, "--log", "debug"])
            .env(PASSWORD_VARIABLE, &secrets.from_env),
        dir.path(),
    );
    let invalid: usize = stream.invalid.values().sum();
    let expected_dead_letters = (invalid + stream.late) as f64;
    wait_for(
        "every event counted and every dead letter delivered",
        Duration::from_secs(90),
        Some(&nsm),
        || {
            assert!(
                nsm.log_text().find("nsm failed").is_none(),
                "{}",
                nsm.log_text()
            );
            let samples = scrape(port)?;
            (metric_value(&samples, "messages_sent", "current")?
                == stream.messages_current_hour as f64
                && samples
                    .get("nsm_dead_letters_total{result=\"delivered\"}")
                    .copied()?
                    == expected_dead_letters)
                .then_some(())
        },
    );
    let status = nsm.terminate(Duration::from_secs(30));
    assert!(status.success(), "{}", nsm.log_text());
    let log = nsm.log_text();
    secrets.assert_absent("the log of nsm run", &log);
    // The properties were logged, masked: the test looked where a leak would be.
    assert!(
        log.contains("sasl.password=***") && log.contains("ssl.key.password=***"),
        "{log}"
    );
    assert!(log.contains("sasl.oauthbearer.config=***"), "{log}");
    // Consumer-only properties (session.timeout.ms, heartbeat.interval.ms in the test
    // config) are not given to the dead-letter producer or the admin client.
    assert!(
        !log.contains("will be ignored by this"),
        "a property reached a client that ignores it:\n{log}"
    );

    // A property librdkafka refuses: the error names it, not its secret value.
    let refused = config_with_secrets(&brokers, dir.path(), port, &secret_file, &secrets)
        .replace("\"sasl.password\"", "\"sasl.pasword\"");
    std::fs::write(&config_path, refused).expect("config");
    let run = Command::new(NSM)
        .args(["run", "--config", config, "--log", "debug"])
        .env(PASSWORD_VARIABLE, &secrets.from_env)
        .output()
        .expect("nsm run");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(!run.status.success(), "{output}");
    assert!(output.contains("sasl.pasword"), "{output}");
    secrets.assert_absent("a refused property's error", &output);

    // A missing variable and a missing file are config errors with their paths.
    std::fs::write(
        &config_path,
        config_with_secrets(
            &brokers,
            dir.path(),
            port,
            &dir.path().join("no-such-file"),
            &secrets,
        ),
    )
    .expect("config");
    for command in ["check", "run"] {
        let output = Command::new(NSM)
            .args([command, "--config", config])
            .env_remove(PASSWORD_VARIABLE)
            .output()
            .expect("nsm");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        for expected in [
            format!(
                "kafka.properties.\"sasl.password\": environment variable {PASSWORD_VARIABLE} \
                 is not set"
            ),
            format!(
                "kafka.properties.\"ssl.key.password\": cannot read secret file {}: No such \
                 file or directory",
                dir.path().join("no-such-file").display()
            ),
        ] {
            assert!(
                stderr.contains(&expected),
                "missing {expected:?} in:\n{stderr}"
            );
        }
        secrets.assert_absent("a config error", &stderr);
    }
}

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A certificate authority and a server certificate for 127.0.0.1 it signed, as PEM.
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    cert_der: Vec<u8>,
}

fn new_pki() -> Pki {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "nsm test CA");
    let ca =
        rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().expect("key"))
            .expect("ca");
    let server_key = rcgen::KeyPair::generate().expect("key");
    let server_params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("server params");
    let cert = server_params
        .signed_by(&server_key, &ca)
        .expect("server cert");
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: server_key.serialize_pem(),
        cert_der: cert.der().to_vec(),
    }
}

/// A response over HTTPS: status, headers (lower-case names), body, and the certificate the
/// server presented.
struct HttpsResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    server_cert: Vec<u8>,
}

impl HttpsResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A GET over HTTPS, trusting only `ca_pem`, with basic auth when `credentials` are given.
fn https_get(
    port: u16,
    path: &str,
    ca_pem: &str,
    credentials: Option<(&str, &str)>,
) -> Option<HttpsResponse> {
    use base64::Engine as _;
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).ok()?)
        .ok()?;
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let server_name = rustls::pki_types::ServerName::try_from("127.0.0.1").ok()?;
    let connection =
        rustls::ClientConnection::new(std::sync::Arc::new(config), server_name).ok()?;
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    let authorization = credentials
        .map(|(user, password)| {
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Authorization: Basic {encoded}\r\n")
        })
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{authorization}\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    // A server closing without close_notify is fine once the response is complete.
    let _ = stream.read_to_end(&mut response);
    let server_cert = stream.conn.peer_certificates()?.first()?.to_vec();
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    Some(HttpsResponse {
        status,
        headers,
        body: body.to_string(),
        server_cert,
    })
}

/// `up` of every job on a Prometheus server, once it has scraped each at least once.
fn up_by_job(prometheus_port: u16) -> Option<Vec<(String, f64)>> {
    let (status, body) = http_get(prometheus_port, "/api/v1/query?query=up")?;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    let mut up: Vec<(String, f64)> = json["data"]["result"]
        .as_array()?
        .iter()
        .filter_map(|series| {
            Some((
                series["metric"]["job"].as_str()?.to_string(),
                series["value"][1].as_str()?.parse().ok()?,
            ))
        })
        .collect();
    up.sort_by(|a, b| a.0.cmp(&b.0));
    (up.len() == 2).then_some(up)
}

#[test]
fn https_with_basic_auth_serves_only_authenticated_clients_and_a_real_prometheus_scrapes_it() {
    assert!(
        Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} is missing: this test needs Debian's prometheus package (`make deps` \
         installs it)"
    );
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("events", 1, 1).expect("topic");
    cluster.create_topic("events-dlq", 1, 1).expect("dlq topic");
    cluster
        .create_topic("nsm-tls-changelog", 1, 1)
        .expect("changelog topic");
    let brokers = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().expect("tempdir");

    let pki = new_pki();
    let cert_file = dir.path().join("tls.crt");
    let key_file = dir.path().join("tls.key");
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&cert_file, &pki.cert_pem).expect("cert");
    std::fs::write(&key_file, &pki.key_pem).expect("key");
    std::fs::write(&ca_file, &pki.ca_pem).expect("ca");

    // The hash comes from `nsm hash-password`, the password from standard input.
    let password = format!("scrape-password-{}", now_ms());
    let mut hasher = Command::new(NSM)
        .args(["hash-password", "--cost", "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("nsm hash-password");
    {
        use std::io::Write;
        let mut stdin = hasher.stdin.take().expect("stdin");
        writeln!(stdin, "{password}").expect("write password");
    }
    let hashed = hasher.wait_with_output().expect("hash-password output");
    assert!(hashed.status.success());
    let hash = String::from_utf8(hashed.stdout)
        .expect("utf8")
        .trim()
        .to_string();
    assert!(hash.starts_with("$2") && hash.len() == 60, "{hash}");

    let port = free_port();
    let listen = format!("listen = \"127.0.0.1:{port}\"\n");
    let secure_config = |cert_file: &Path| {
        test_config(
            &brokers,
            "events",
            &dir.path().join("state"),
            port,
            "nsm-tls",
        )
        .replace(
            &listen,
            &format!(
                "{listen}[http.tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n\
                 [http.basic_auth]\nusers = {{ prometheus = \"{hash}\" }}\n",
                cert = cert_file.display(),
                key = key_file.display(),
            ),
        )
    };
    let config_path = dir.path().join("nsm.toml");
    let config = config_path.to_str().expect("utf8");

    // A certificate that cannot be read stops nsm at once, naming the file.
    let missing = dir.path().join("no-such.crt");
    std::fs::write(&config_path, secure_config(&missing)).expect("config");
    let output = Command::new(NSM)
        .args(["run", "--config", config])
        .output()
        .expect("nsm run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let expected = format!(
        "cannot read http.tls.cert_file {}: No such file or directory",
        missing.display()
    );
    assert!(
        stderr.contains(&expected),
        "missing {expected:?} in:\n{stderr}"
    );

    // `nsm check` (systemd's ExecStartPre) catches it too.
    let output = Command::new(NSM)
        .args(["check", "--config", config])
        .output()
        .expect("nsm check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains(&expected),
        "{stderr}"
    );

    std::fs::write(&config_path, secure_config(&cert_file)).expect("config");
    let output = Command::new(NSM)
        .args(["check", "--config", config])
        .output()
        .expect("nsm check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!(
            "http: https://127.0.0.1:{port}, basic auth for 1 user"
        )),
        "{stdout}"
    );
    let nsm = Process::spawn(
        "nsm",
        Command::new(NSM).args(["run", "--config", config]),
        dir.path(),
    );
    let credentials = Some(("prometheus", password.as_str()));
    let scraped = wait_for(
        "an authenticated HTTPS scrape",
        Duration::from_secs(30),
        Some(&nsm),
        || {
            https_get(port, "/metrics", &pki.ca_pem, credentials)
                .filter(|response| response.status == 200)
        },
    );
    assert!(scraped.body.contains("nsm_build_info"), "{}", scraped.body);
    assert_eq!(scraped.server_cert, pki.cert_der);

    // Without credentials, or with a wrong password: 401 and a basic-auth challenge.
    for (what, credentials) in [
        ("no credentials", None),
        ("a wrong password", Some(("prometheus", "wrong"))),
        ("an unknown user", Some(("grafana", password.as_str()))),
    ] {
        for path in ["/metrics", "/api/v1/metrics"] {
            let response = https_get(port, path, &pki.ca_pem, credentials).expect("response");
            assert_eq!(response.status, 401, "{path} with {what}");
            assert!(
                response
                    .header("www-authenticate")
                    .is_some_and(|challenge| challenge.starts_with("Basic realm=")),
                "{path} with {what}: {:?}",
                response.headers
            );
        }
    }
    let api = https_get(port, "/api/v1/metrics", &pki.ca_pem, credentials).expect("api");
    assert_eq!(api.status, 200);
    assert!(api.body.contains("daily_active_messagers"), "{}", api.body);
    // The probes stay open for the kubelet.
    let health = https_get(port, "/healthz", &pki.ca_pem, None).expect("healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    wait_for("ready", Duration::from_secs(30), Some(&nsm), || {
        (https_get(port, "/readyz", &pki.ca_pem, None)?.status == 200).then_some(())
    });
    // Plain HTTP on the HTTPS port gets no response.
    assert!(http_get(port, "/metrics").is_none_or(|(status, _)| status != 200));

    // A real Prometheus scrapes over HTTPS, trusting the CA, with the password from a file;
    // a second job with a wrong password must see nsm as down.
    let password_file = dir.path().join("scrape-password");
    std::fs::write(&password_file, &password).expect("password file");
    let prometheus_port = free_port();
    let prometheus_config = dir.path().join("prometheus.yml");
    let job = |name: &str, password: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n\
             \x20   basic_auth:\n      username: prometheus\n      {password}\n\
             \x20   static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
            ca = ca_file.display(),
        )
    };
    std::fs::write(
        &prometheus_config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n{}{}",
            job(
                "nsm",
                &format!("password_file: {}", password_file.display())
            ),
            job("nsm-wrong-password", "password: wrong"),
        ),
    )
    .expect("prometheus config");
    let prometheus = Process::spawn(
        "prometheus",
        Command::new(PROMETHEUS).args([
            &format!("--config.file={}", prometheus_config.display()),
            &format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            &format!("--web.listen-address=127.0.0.1:{prometheus_port}"),
        ]),
        dir.path(),
    );
    let up = wait_for(
        "Prometheus to scrape both jobs",
        Duration::from_secs(60),
        Some(&prometheus),
        || up_by_job(prometheus_port).filter(|up| up.iter().any(|(_, value)| *value == 1.0)),
    );
    assert_eq!(
        up,
        [
            ("nsm".to_string(), 1.0),
            ("nsm-wrong-password".to_string(), 0.0)
        ],
        "Prometheus log:\n{}",
        prometheus.log_text()
    );

    // The second job is down for its password, not for TLS: nsm answered 401.
    let (_, targets) = http_get(prometheus_port, "/api/v1/targets").expect("targets");
    let targets: serde_json::Value = serde_json::from_str(&targets).expect("targets JSON");
    let wrong = targets["data"]["activeTargets"]
        .as_array()
        .expect("active targets")
        .iter()
        .find(|target| target["labels"]["job"] == "nsm-wrong-password")
        .expect("the wrong-password target");
    assert!(
        wrong["lastError"]
            .as_str()
            .is_some_and(|error| error.contains("401")),
        "{wrong}"
    );

    // A rotated certificate is served without a restart.
    let rotated = new_pki();
    std::fs::write(&key_file, &rotated.key_pem).expect("key");
    std::fs::write(&cert_file, &rotated.cert_pem).expect("cert");
    wait_for(
        "the rotated certificate",
        Duration::from_secs(30),
        Some(&nsm),
        || {
            let response = https_get(port, "/healthz", &rotated.ca_pem, None)?;
            (response.server_cert == rotated.cert_der).then_some(())
        },
    );

    let log = nsm.log_text();
    assert!(log.contains("TLS certificate reloaded"), "{log}");
    assert!(!log.contains(&password), "nsm logged the password:\n{log}");
}
