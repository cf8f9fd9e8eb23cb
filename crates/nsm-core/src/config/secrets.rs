//! Secrets in the config: `${NAME}` and `${file:PATH}` references in Kafka properties, and
//! [`KafkaProperties`], which hands secret values to librdkafka and to nothing else.
//!
//! The core does no I/O: the program passes a [`Resolver`] that reads the process
//! environment and the file system.

use std::collections::BTreeMap;
use std::fmt;

/// Resolves the references in `kafka.properties`: `${NAME}` through `env`, `${file:PATH}`
/// through `file` (the whole file, one trailing newline removed).
pub struct Resolver<'a> {
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// The text of a file, or why it cannot be read (never its content).
    pub file: &'a dyn Fn(&str) -> Result<String, String>,
}

/// Property names whose values are secret whatever their origin. Matched as substrings of
/// the lower-cased name: `sasl.password`, `ssl.key.password`, `ssl.keystore.password`,
/// `ssl.key.pem`, `sasl.oauthbearer.client.secret`,
/// `sasl.oauthbearer.assertion.private.key.passphrase`, and names of the same kind. Paths
/// such as `ssl.key.location` match too; masking a path costs nothing.
const SECRET_NAME_PARTS: [&str; 7] = [
    "pass",
    "secret",
    "key",
    "token",
    "credential",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.extensions",
];

/// What a secret value shows as in logs, config dumps and errors.
pub const REDACTED: &str = "***";

/// True for property names whose values must never be shown.
pub fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_NAME_PARTS.iter().any(|part| name.contains(part))
}

#[derive(Clone, PartialEq, Eq)]
struct Property {
    value: String,
    secret: bool,
}

/// librdkafka properties, after `${...}` expansion. A value is secret when its name says so
/// ([`is_secret_name`]) or when it came from the environment or a file. Secret values show
/// as `***` in `Debug` and [`KafkaProperties::redacted`]; only [`KafkaProperties::iter`]
/// hands them out, for librdkafka.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties {
    entries: BTreeMap<String, Property>,
}

impl KafkaProperties {
    /// Sets a property; it is secret if its name says so.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let key = key.into();
        let secret = is_secret_name(&key);
        self.entries.insert(
            key,
            Property {
                value: value.into(),
                secret,
            },
        );
    }

    /// Sets a property whose value is secret whatever its name.
    pub fn insert_secret(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.entries.insert(
            key.into(),
            Property {
                value: value.into(),
                secret: true,
            },
        );
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .get(key)
            .map(|property| property.value.as_str())
    }

    pub fn is_secret(&self, key: &str) -> bool {
        self.entries
            .get(key)
            .is_some_and(|property| property.secret)
    }

    /// Every property with its real value: for librdkafka only, never for display.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .map(|(key, property)| (key.as_str(), property.value.as_str()))
    }

    /// The secret values, to scrub them from text that might echo one (librdkafka errors).
    pub fn secret_values(&self) -> impl Iterator<Item = &str> {
        self.entries
            .values()
            .filter(|property| property.secret && !property.value.is_empty())
            .map(|property| property.value.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// `key=value, ...` with secret values as `***`: safe for logs.
    pub fn redacted(&self) -> String {
        let parts: Vec<String> = self
            .entries
            .iter()
            .map(|(key, property)| format!("{key}={}", shown(property)))
            .collect();
        parts.join(", ")
    }

    /// `text` with every secret value replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        let mut text = text.to_string();
        for secret in self.secret_values() {
            text = text.replace(secret, REDACTED);
        }
        text
    }
}

fn shown(property: &Property) -> &str {
    if property.secret {
        REDACTED
    } else {
        &property.value
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.entries
                    .iter()
                    .map(|(key, property)| (key, shown(property))),
            )
            .finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for KafkaProperties {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut properties = KafkaProperties::default();
        for (key, value) in iter {
            properties.insert(key, value);
        }
        properties
    }
}

/// Replaces `${NAME}` with the environment variable NAME and `${file:PATH}` with the content
/// of the file PATH (one trailing newline removed); `$$` is a literal `$`. Returns the text
/// and whether it used a reference. Errors name the variable or the file, never a value.
pub(super) fn expand(text: &str, resolver: &Resolver<'_>) -> Result<(String, bool), String> {
    let mut out = String::with_capacity(text.len());
    let mut used_reference = false;
    let mut rest = text;
    while let Some(position) = rest.find('$') {
        out.push_str(&rest[..position]);
        let after = &rest[position + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(close) = body.find('}') else {
                return Err("unterminated ${...} reference".to_string());
            };
            let reference = &body[..close];
            out.push_str(&resolve(reference, resolver)?);
            used_reference = true;
            rest = &body[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok((out, used_reference))
}

fn resolve(reference: &str, resolver: &Resolver<'_>) -> Result<String, String> {
    if let Some(path) = reference.strip_prefix("file:") {
        if path.is_empty() {
            return Err("${file:} names no file; write ${file:/path/to/secret}".to_string());
        }
        let text = (resolver.file)(path)?;
        let text = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text);
        if text.is_empty() {
            return Err(format!("secret file {path} is empty"));
        }
        return Ok(text.to_string());
    }
    let valid_name = !reference.is_empty()
        && reference
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        return Err(format!(
            "invalid reference ${{{reference}}}: expected ${{NAME}} (an environment variable) \
             or ${{file:/path}}"
        ));
    }
    (resolver.env)(reference).ok_or_else(|| format!("environment variable {reference} is not set"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver_test(text: &str) -> Result<(String, bool), String> {
        let env = |name: &str| (name == "PASSWORD").then(|| "env-secret".to_string());
        let file = |path: &str| match path {
            "/run/secrets/kafka" => Ok("file-secret\n".to_string()),
            "/run/secrets/crlf" => Ok("crlf-secret\r\n".to_string()),
            "/run/secrets/empty" => Ok("\n".to_string()),
            _ => Err(format!("cannot read secret file {path}: not found")),
        };
        expand(
            text,
            &Resolver {
                env: &env,
                file: &file,
            },
        )
    }

    #[test]
    fn references_read_the_environment_and_files() {
        assert_eq!(
            resolver_test("${PASSWORD}"),
            Ok(("env-secret".to_string(), true))
        );
        assert_eq!(
            resolver_test("${file:/run/secrets/kafka}"),
            Ok(("file-secret".to_string(), true))
        );
        assert_eq!(
            resolver_test("${file:/run/secrets/crlf}"),
            Ok(("crlf-secret".to_string(), true))
        );
        assert_eq!(resolver_test("a$$b$c"), Ok(("a$b$c".to_string(), false)));
    }

    #[test]
    fn unresolved_references_name_the_variable_or_file() {
        assert_eq!(
            resolver_test("${MISSING}"),
            Err("environment variable MISSING is not set".to_string())
        );
        assert_eq!(
            resolver_test("${file:/nope}"),
            Err("cannot read secret file /nope: not found".to_string())
        );
        assert_eq!(
            resolver_test("${file:/run/secrets/empty}"),
            Err("secret file /run/secrets/empty is empty".to_string())
        );
        assert!(resolver_test("${file:}").is_err());
        assert!(resolver_test("${not a name}")
            .expect_err("not a variable name")
            .contains("expected ${NAME}"));
        assert!(resolver_test("${OPEN").is_err());
    }

    #[test]
    fn secret_values_never_show_in_debug_or_redacted_output() {
        let mut properties: KafkaProperties = [
            ("security.protocol", "SASL_SSL"),
            ("sasl.username", "nsm"),
            ("sasl.password", "hunter2-password"),
            ("ssl.key.password", "key-pass"),
            ("sasl.oauthbearer.config", "clientSecret=oauth-secret"),
            ("sasl.oauthbearer.client.secret", "client-secret"),
            ("ssl.key.pem", "-----BEGIN PRIVATE KEY-----"),
        ]
        .into_iter()
        .collect();
        properties.insert_secret("ssl.ca.location", "/from/the/environment");
        let debug = format!("{properties:?}");
        let redacted = properties.redacted();
        for secret in [
            "hunter2-password",
            "key-pass",
            "oauth-secret",
            "client-secret",
            "PRIVATE KEY",
            "/from/the/environment",
        ] {
            assert!(!debug.contains(secret), "{debug}");
            assert!(!redacted.contains(secret), "{redacted}");
        }
        assert!(
            debug.contains("SASL_SSL") && debug.contains("\"nsm\""),
            "{debug}"
        );
        assert!(redacted.contains("sasl.password=***"), "{redacted}");
        assert_eq!(properties.get("sasl.password"), Some("hunter2-password"));
        assert_eq!(
            properties.scrub("bad value hunter2-password for sasl.password"),
            "bad value *** for sasl.password"
        );
        assert!(!properties.is_secret("sasl.username"));
    }
}
