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
