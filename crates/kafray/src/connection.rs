//! How kafray's Kafka clients connect to a cluster.
//!
//! - librdkafka properties come from a `client.properties` file (`--kafka-config`, Java's
//!   format, as `kcat -F` reads one), then from `-X key=value` over it.
//! - A value may be a reference in Kafka's config-provider syntax, `${env:NAME}` or
//!   `${file:PATH:KEY}`: it is resolved only in the process that connects, so the secret never
//!   travels in arguments (a process's command line, a Ray actor's creation arguments).
//! - Secrets (passwords, keys, client secrets) are shown as `***` where a message would name a
//!   property's value ([`shown`]).
//! - TLS certificate verification stays on unless `--insecure-skip-tls-verify` says otherwise.
//! - A client that cannot connect says why, with the fix: [`ErrorRecorder`] keeps what
//!   librdkafka reported, which a bare metadata timeout would hide.
use crate::error::{Error, Result};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use std::path::Path;
use std::sync::Mutex;

/// How a secret is shown.
pub const REDACTED: &str = "***";

/// Whether a property's value is a secret: any `*password*`, `*passphrase*` or `*secret*`, and
/// the properties that carry a private key or credentials inline (librdkafka's and Java's).
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "passphrase", "secret", "private.key"].iter().any(|word| k.contains(word))
        || k.ends_with("key.pem")
        || matches!(k.as_str(), "ssl_key" | "ssl.keystore.key" | "sasl.jaas.config" | "sasl.oauthbearer.config")
}

/// A property's value as it may be shown in a message: a secret as `***`; a reference
/// (`${env:...}`) is not a secret and is shown as written.
pub fn shown<'a>(key: &str, value: &'a str) -> &'a str {
    if is_secret(key) && !is_reference(value) {
        REDACTED
    } else {
        value
    }
}

/// `file`'s properties, then `given` over them (a later one wins in librdkafka), unresolved.
pub fn gather(file: Option<&Path>, given: &[(String, String)]) -> Result<Vec<(String, String)>> {
    let mut properties = match file {
        Some(path) => read_properties(path)?,
        None => Vec::new(),
    };
    properties.extend(given.iter().cloned());
    Ok(properties)
}

/// What a client is given: [`gather`]ed, resolved and checked ([`check_tls_verification`]).
pub fn client_properties(
    file: Option<&Path>,
    given: &[(String, String)],
    insecure_skip_tls_verify: bool,
) -> Result<Vec<(String, String)>> {
    let properties = resolve(&gather(file, given)?)?;
    check_tls_verification(&properties, insecure_skip_tls_verify)?;
    Ok(properties)
}

/// Reads a `client.properties` file (Java's properties format: `key=value`, `key: value`,
/// `#` comments), sorted by key.
pub fn read_properties(path: &Path) -> Result<Vec<(String, String)>> {
    let file = std::fs::File::open(path).map_err(|e| {
        Error::Config(format!("--kafka-config {}: {e}: give a readable client.properties file", path.display()))
    })?;
    // UTF-8, as the file's other readers (kcat -F, librdkafka) take bytes; Java's escapes apply.
    let mut read = std::collections::HashMap::new();
    java_properties::PropertiesIter::new_with_encoding(std::io::BufReader::new(file), encoding_rs::UTF_8)
        .read_into(|k, v| {
            read.insert(k, v);
        })
        .map_err(|e| {
            // The parser's message names the line, never its content.
            Error::Config(format!(
                "--kafka-config {}: {e}: expected `key=value` lines, as Kafka's client.properties",
                path.display()
            ))
        })?;
    let mut properties: Vec<(String, String)> = read.into_iter().collect();
    properties.sort();
    if properties.iter().any(|(k, v)| is_secret(k) && !is_reference(v)) {
        warn_if_readable_by_others(path);
    }
    Ok(properties)
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "{} holds a secret and other users may read it: chmod 600 {}",
                path.display(),
                path.display()
            );
        }
    }
}

/// Whether a value names a secret (`${env:NAME}`, `${file:PATH:KEY}`) rather than holding it.
pub fn is_reference(value: &str) -> bool {
    value.starts_with("${") && value.ends_with('}')
}

/// Replaces each `${env:NAME}` and `${file:PATH:KEY}` value with what it names.
pub fn resolve(properties: &[(String, String)]) -> Result<Vec<(String, String)>> {
    properties
        .iter()
        .map(|(k, v)| {
            let Some(reference) = v.strip_prefix("${").and_then(|r| r.strip_suffix('}')).filter(|_| is_reference(v))
            else {
                return Ok((k.clone(), v.clone()));
            };
            let value = match reference.split_once(':') {
                Some(("env", name)) => std::env::var(name).map_err(|_| {
                    Error::Config(format!(
                        "{k}={v}: the environment variable {name} is not set: export it, or give the value"
                    ))
                })?,
                Some(("file", path_and_key)) => {
                    let Some((path, key)) = path_and_key.rsplit_once(':') else {
                        return Err(Error::Config(format!(
                            "{k}={v}: a file reference names the file and a key in it: ${{file:PATH:KEY}}"
                        )));
                    };
                    let found = read_properties(Path::new(path))?.into_iter().find(|(name, _)| name == key);
                    found
                        .map(|(_, value)| value)
                        .ok_or_else(|| Error::Config(format!("{k}={v}: {path} has no property {key}")))?
                }
                // Not echoed: a secret may happen to look like a reference.
                _ => {
                    return Err(Error::Config(format!(
                        "{k}: a value of the form ${{...}} is a reference, and kafray resolves ${{env:NAME}} and \
                         ${{file:PATH:KEY}}: use one of those"
                    )))
                }
            };
            Ok((k.clone(), value))
        })
        .collect()
}

/// Refuses properties that turn off the check that the broker is who it claims to be, unless
/// `insecure` (`--insecure-skip-tls-verify`) accepts the risk; then each is warned about.
pub fn check_tls_verification(properties: &[(String, String)], insecure: bool) -> Result<()> {
    for (k, v) in properties {
        let off = v.trim().to_ascii_lowercase();
        let weakens = match k.as_str() {
            // librdkafka reads a boolean as false from "false", "f" or "0", in any case.
            "enable.ssl.certificate.verification" => matches!(off.as_str(), "false" | "f" | "0" | "no" | "off"),
            "ssl.endpoint.identification.algorithm" => off == "none",
            _ => false,
        };
        if !weakens {
            continue;
        }
        if !insecure {
            return Err(Error::Config(format!(
                "{k}={v} is refused: it turns off the check that the broker is the one it claims to be, \
                 so anyone on the path could read the frames and the credentials. Give the broker's CA \
                 certificate instead (ssl.ca.location=ca.pem), or pass --insecure-skip-tls-verify to accept the risk"
            )));
        }
        tracing::warn!(
            "{k}={v}: TLS verification is weakened (--insecure-skip-tls-verify); do not use this in production"
        );
    }
    Ok(())
}

/// A client context that keeps the last error librdkafka reported (an authentication failure,
/// a TLS handshake that failed), so that a request that then times out can say why.
#[derive(Default)]
pub struct ErrorRecorder {
    error: Mutex<Option<String>>,
    /// A connection that failed without an error event: a plaintext client whose TLS broker
    /// hangs up is only logged (`FAIL`, at info level).
    failed_connection: Mutex<Option<String>>,
}

impl ErrorRecorder {
    /// The last error reported, else the last connection failure logged.
    pub fn last(&self) -> Option<String> {
        self.error.lock().unwrap().clone().or_else(|| self.failed_connection.lock().unwrap().clone())
    }
}

impl ClientContext for ErrorRecorder {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if fac == "FAIL" {
            *self.failed_connection.lock().unwrap() = Some(log_message.to_string());
        }
        DefaultClientContext.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!("librdkafka: {error}: {reason}");
        // "1/1 brokers are down" follows every failure and says nothing of its cause.
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
            *self.error.lock().unwrap() = Some(reason.to_string());
        }
    }
}

/// Only so that a producer can carry it; it never sends.
impl ProducerContext for ErrorRecorder {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// Whether a reported failure is one that waiting cannot mend: credentials or a mechanism the
/// broker refused, a certificate that is not trusted. A request that failed on the way (a
/// transport failure, a timeout inside the SASL exchange) may pass on the next try.
pub fn cannot_mend(reported: &str) -> bool {
    let said = reported.to_ascii_lowercase();
    let transient = said.contains("transport failure") || said.contains("timed out");
    !transient && (refused_credentials(&said) || said.contains("certificate verify failed"))
}

fn refused_credentials(said: &str) -> bool {
    said.contains("authentication failed") || said.contains("unsupported sasl mechanism")
}

/// Why a client's `request` to `brokers` failed, from librdkafka's last report (`reported`), with
/// the fix; `properties` are the client's (for the mechanism and user named, never the password).
pub fn explain_unreachable(
    brokers: &str,
    request: &str,
    reported: Option<&str>,
    properties: &[(String, String)],
) -> String {
    let get = |key: &str| properties.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let protocol = get("security.protocol").unwrap_or("plaintext").to_ascii_uppercase();
    let Some(reported) = reported else {
        return format!(
            "no answer from {brokers} ({request}; security.protocol={protocol}): check --brokers and that the broker is up"
        );
    };
    let said = reported.to_ascii_lowercase();
    let tls = protocol.ends_with("SSL");
    let fix = if said.contains("might require sasl authentication") || (protocol == "SSL" && said.contains("state up"))
    {
        "the broker closed the connection once it was up: it probably requires SASL authentication; set \
         security.protocol=SASL_SSL (or SASL_PLAINTEXT) with sasl.mechanisms, sasl.username and sasl.password"
            .to_string()
    } else if refused_credentials(&said) {
        let mechanism = get("sasl.mechanisms").or(get("sasl.mechanism")).unwrap_or("GSSAPI");
        let user = get("sasl.username").or(get("sasl.oauthbearer.client.id")).unwrap_or("");
        format!(
            "authentication failed with SASL mechanism {mechanism} as user {user:?}: check sasl.username, \
             sasl.password and sasl.mechanisms against the broker's users"
        )
    } else if said.contains("certificate verify failed") {
        "the broker's TLS certificate could not be verified: give the CA that signed it with \
         ssl.ca.location=ca.pem (or install it in the system's trust store); if that CA is right, the \
         certificate does not name the address in --brokers"
            .to_string()
    } else if !tls && (said.contains("apiversion_query") || said.contains("ssl listener")) {
        "the broker hung up on a plaintext client as soon as it spoke: it may speak TLS there; if so, set \
         security.protocol=SSL (or SASL_SSL with SASL credentials) and ssl.ca.location"
            .to_string()
    } else if tls && said.contains("plaintext") {
        "the broker hung up during the TLS handshake: check that this port serves TLS, and security.protocol"
            .to_string()
    } else {
        format!("check --brokers and security.protocol (now {protocol})")
    };
    format!("cannot connect to {brokers}: {reported}\n  fix: {fix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn secrets_are_redacted_and_the_rest_shown_as_given() {
        let given = [
            ("sasl.password", "hunter2"),
            ("ssl.key.password", "k"),
            ("sasl.oauthbearer.client.secret", "s"),
            ("ssl.keystore.password", "p"),
            ("ssl.truststore.password", "p"),
            ("ssl.key.pem", "-----BEGIN PRIVATE KEY-----"),
            ("sasl.oauthbearer.assertion.private.key.passphrase", "p"),
            ("sasl.oauthbearer.assertion.private.key.pem", "-----BEGIN PRIVATE KEY-----"),
            ("ssl.keystore.key", "-----BEGIN PRIVATE KEY-----"),
            ("sasl.jaas.config", "ScramLoginModule required password=\"p\";"),
            ("sasl.username", "alice"),
            ("security.protocol", "SASL_SSL"),
            ("sasl.password", "${env:KAFKA_PASSWORD}"),
        ];
        let values: Vec<&str> = given.iter().map(|(k, v)| shown(k, v)).collect();
        assert_eq!(values[..10], ["***"; 10]);
        assert_eq!(values[10..], ["alice", "SASL_SSL", "${env:KAFKA_PASSWORD}"]);
    }

    /// librdkafka's own words, as it reports them (2.12, against a TLS + SCRAM broker).
    #[test]
    fn start_failures_are_explained_with_the_fix_and_only_refusals_end_the_wait() {
        let scram = props(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.username", "alice"),
            ("sasl.password", "hunter2"),
        ]);
        let ssl = props(&[("security.protocol", "SSL")]);
        let explain = |reported: &str, properties: &[(String, String)]| {
            (explain_unreachable("b:9093", "metadata", Some(reported), properties), cannot_mend(reported))
        };
        // (what librdkafka reported, the client's properties, whether the wait ends, the fix named)
        type Case<'a> = (&'a str, &'a [(String, String)], bool, &'a str);
        let cases: [Case; 7] = [
            (
                "sasl_ssl://b:9093/bootstrap: SASL authentication error: SASL SCRAM authentication failed: broker \
                 responded with invalid-proof (after 17ms in state AUTH_REQ)",
                &scram,
                true,
                "authentication failed with SASL mechanism SCRAM-SHA-512 as user \"alice\"",
            ),
            (
                "sasl_ssl://b:9093/bootstrap: SASL PLAIN mechanism handshake failed: Broker: Unsupported SASL \
                 mechanism: broker's supported mechanisms: SCRAM-SHA-512,SCRAM-SHA-256 (after 0ms in state \
                 AUTH_HANDSHAKE)",
                &scram,
                true,
                "authentication failed",
            ),
            (
                "sasl_ssl://b:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify \
                 failed: broker certificate could not be verified, verify that ssl.ca.location is correctly \
                 configured or root CA certificates are installed (install ca-certificates package) (after 1ms in \
                 state SSL_HANDSHAKE)",
                &scram,
                true,
                "ssl.ca.location=ca.pem",
            ),
            (
                "b:9093/bootstrap: Disconnected: connection closed by peer: receive 0 after POLLIN (after 0ms in \
                 state APIVERSION_QUERY)",
                &[],
                false,
                "security.protocol=SSL",
            ),
            // A client without SASL at a listener that requires it: not a wrong password.
            (
                "ssl://b:9093/bootstrap: Disconnected: verify that security.protocol is correctly configured, \
                 broker might require SASL authentication (after 0ms in state UP)",
                &ssl,
                false,
                "security.protocol=SASL_SSL",
            ),
            (
                "ssl://b:9093/bootstrap: Send failed: SSL transport error: Broken pipe (after 0ms in state UP)",
                &ssl,
                false,
                "security.protocol=SASL_SSL",
            ),
            // Failures on the way may pass on the next try.
            (
                "sasl_ssl://b:9093/bootstrap: SASL authentication error: SaslAuthenticateRequest failed: Local: \
                 Broker transport failure (after 5ms in state AUTH_REQ)",
                &scram,
                false,
                "cannot connect",
            ),
        ];
        for (reported, properties, final_, fix) in cases {
            let (said, ends_wait) = explain(reported, properties);
            assert_eq!(ends_wait, final_, "{reported}");
            assert!(said.contains(fix) && !said.contains("hunter2"), "{said}");
        }
        let (said, _) = explain(
            "ssl://b:9093/bootstrap: Disconnected: verify that security.protocol is correctly configured, broker \
             might require SASL authentication (after 0ms in state UP)",
            &ssl,
        );
        assert!(!said.contains("authentication failed"), "{said}");
    }

    #[test]
    fn a_properties_file_is_read_and_flags_come_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("client.properties");
        std::fs::write(
            &file,
            "# a comment\nsecurity.protocol=SASL_SSL\nsasl.mechanisms = SCRAM-SHA-512\nsasl.password: p=ss#1\n\n",
        )
        .unwrap();
        let all = gather(Some(&file), &props(&[("security.protocol", "SSL")])).unwrap();
        assert_eq!(
            all,
            props(&[
                ("sasl.mechanisms", "SCRAM-SHA-512"),
                ("sasl.password", "p=ss#1"),
                ("security.protocol", "SASL_SSL"),
                ("security.protocol", "SSL"),
            ])
        );
        let missing = gather(Some(&dir.path().join("nope")), &[]).unwrap_err().to_string();
        assert!(missing.contains("--kafka-config") && missing.contains("nope"), "{missing}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure returns figment's own error
    fn references_are_resolved_from_the_environment_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets.properties");
        std::fs::write(&secrets, "kafka.password=from-file\n").unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("KAFRAY_TEST_SECRET", "from-env");
            let reference = format!("${{file:{}:kafka.password}}", secrets.display());
            let resolved =
                resolve(&props(&[("sasl.password", "${env:KAFRAY_TEST_SECRET}"), ("ssl.key.password", &reference)]))
                    .unwrap();
            assert_eq!(resolved, props(&[("sasl.password", "from-env"), ("ssl.key.password", "from-file")]));
            let unset = resolve(&props(&[("sasl.password", "${env:KAFRAY_TEST_UNSET}")])).unwrap_err().to_string();
            assert!(unset.contains("KAFRAY_TEST_UNSET is not set"), "{unset}");
            let unknown = resolve(&props(&[("sasl.password", "${vault:x}")])).unwrap_err().to_string();
            assert!(unknown.contains("is a reference") && !unknown.contains("vault"), "{unknown}");
            Ok(())
        });
    }

    #[test]
    fn turning_tls_verification_off_needs_the_insecure_flag() {
        for (k, v) in [
            ("enable.ssl.certificate.verification", "false"),
            ("enable.ssl.certificate.verification", "F"),
            ("enable.ssl.certificate.verification", "0"),
            ("ssl.endpoint.identification.algorithm", "none"),
        ] {
            let p = props(&[(k, v)]);
            let refused = check_tls_verification(&p, false).unwrap_err().to_string();
            assert!(refused.contains("--insecure-skip-tls-verify") && refused.contains("ssl.ca.location"), "{refused}");
            check_tls_verification(&p, true).unwrap();
        }
        check_tls_verification(&props(&[("enable.ssl.certificate.verification", "true")]), false).unwrap();
    }
}
