//! `dispatcher.toml`: every setting of the daemon, with its default and its checks (SPEC §3).
//!
//! Loading goes file (or built-in defaults) → `DISPATCHER_<SECTION>_<KEY>` environment overrides →
//! serde → [`Config::validate`]. Every error names the dotted key it is about (`server.listen`,
//! `api.tokens[0].role`), and the environment variable when an override caused it, so an operator
//! can fix it without reading the source. `dispatcher check-config` prints [`Config::to_masked_toml`].

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use url::Url;

use crate::delivery::retry::{Policies, RetryError};

/// The file `serve` and `check-config` read when no `--config` is given.
pub const DEFAULT_PATH: &str = "./dispatcher.toml";

/// Prefix of the environment overrides.
const ENV_PREFIX: &str = "DISPATCHER_";

/// The sections an environment variable can override. `retry` is left out: policies are nested
/// tables that an env var cannot express sensibly.
const ENV_SECTIONS: [&str; 9] = [
    "server",
    "storage",
    "account",
    "api",
    "limits",
    "delivery",
    "disable",
    "retention",
    "log",
];

/// What replaces a secret in [`Config::to_masked_toml`] and in `Debug` output.
const MASK: &str = "***";

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An explicit `--config` path that does not exist.
    #[error("config file {} not found", path.display())]
    NotFound { path: PathBuf },
    /// The file exists but could not be read (permissions, not UTF-8, …).
    #[error("cannot read config file {}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    /// Not valid TOML; `message` is the toml crate's report with line and column.
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    /// A key that no section has (usually a typo).
    #[error("unknown key {key}")]
    UnknownKey { key: String },
    /// A key whose value is wrong; `key` is the full dotted path.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    /// An environment override that is malformed or whose value was refused. The value itself is
    /// not repeated: it may be a token.
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The dotted key the error is about, if it is about one.
    fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key } | ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// The whole of `dispatcher.toml`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub account: AccountConfig,
    pub api: ApiConfig,
    pub limits: LimitsConfig,
    pub delivery: DeliveryConfig,
    pub disable: DisableConfig,
    pub retention: RetentionConfig,
    pub retry: RetryConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Largest request body in bytes; larger requests get 413.
    #[serde(with = "byte_size")]
    pub max_body: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
            max_body: 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub path: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("./data/dispatcher.sled"),
        }
    }
}

/// The `account` block sent with every amoCRM-format payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccountConfig {
    pub subdomain: String,
    /// A JSON number or string, sent exactly as configured.
    #[serde(deserialize_with = "account_id")]
    pub id: serde_json::Value,
    /// `None`: `https://{subdomain}.amocrm.ru` (see [`AccountConfig::link`]).
    #[serde(
        deserialize_with = "optional_link",
        skip_serializing_if = "Option::is_none"
    )]
    pub link: Option<String>,
}

impl Default for AccountConfig {
    fn default() -> Self {
        AccountConfig {
            subdomain: "example".to_string(),
            id: serde_json::Value::from(1),
            link: None,
        }
    }
}

impl AccountConfig {
    /// The account's link as sent in `account._links.self`.
    pub fn link(&self) -> String {
        match &self.link {
            Some(link) => link.clone(),
            None => format!("https://{}.amocrm.ru", self.subdomain),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Empty: development mode, loopback only, every request is admin.
    pub tokens: Vec<TokenConfig>,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub token: String,
    pub role: Role,
}

// Written by hand so that a config printed with `{:?}` (in a log line, a panic) never shows a token.
impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("token", &MASK)
            .field("role", &self.role)
            .finish()
    }
}

/// What a bearer token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// `POST` events.
    Emitter,
    /// Every `GET`, the attempt stream, `/metrics`.
    Reader,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Enabled subscriptions at most (amoCRM's limit).
    pub max_subscriptions: usize,
    /// Events in one intake request at most.
    pub max_batch: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_subscriptions: 100,
            max_batch: 1000,
        }
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Per attempt.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Attempts in flight in all.
    pub concurrency: usize,
    /// Attempts in flight to one subscription.
    pub per_subscription: usize,
    /// May contain `{version}`; use [`DeliveryConfig::user_agent`] for the header value.
    pub user_agent: String,
    /// Private destinations allowed despite the SSRF guard.
    #[serde(with = "ip_nets")]
    pub allow_private: Vec<IpNet>,
    /// Egress proxy for every attempt; `""` in TOML means none.
    #[serde(with = "proxy_url")]
    pub proxy: Option<Url>,
    /// The longest `Retry-After` (on 429/503) that is honoured.
    #[serde(with = "duration")]
    pub max_retry_after: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            timeout: Duration::from_secs(2),
            concurrency: 512,
            per_subscription: 16,
            user_agent: "webhook-dispatcher/{version}".to_string(),
            allow_private: Vec::new(),
            proxy: None,
            max_retry_after: Duration::from_secs(60 * 60),
        }
    }
}

// By hand because a proxy URL may carry a password.
impl fmt::Debug for DeliveryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliveryConfig")
            .field("timeout", &self.timeout)
            .field("concurrency", &self.concurrency)
            .field("per_subscription", &self.per_subscription)
            .field("user_agent", &self.user_agent)
            .field("allow_private", &self.allow_private)
            .field(
                "proxy",
                &self.proxy.as_ref().map(|url| masked_url(url).to_string()),
            )
            .field("max_retry_after", &self.max_retry_after)
            .finish()
    }
}

impl DeliveryConfig {
    /// The `User-Agent` header value, `{version}` replaced by this build's version.
    pub fn user_agent(&self) -> String {
        self.user_agent
            .replace("{version}", env!("CARGO_PKG_VERSION"))
    }
}

/// amoCRM's rule: more than `threshold` failed attempts within `window`, the latest failed too →
/// the subscription is disabled until re-enabled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DisableConfig {
    #[serde(with = "duration")]
    pub window: Duration,
    pub threshold: u32,
}

impl Default for DisableConfig {
    fn default() -> Self {
        DisableConfig {
            window: Duration::from_secs(2 * 60 * 60),
            threshold: 100,
        }
    }
}

/// How long delivery records are kept after they end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    #[serde(with = "duration")]
    pub delivered: Duration,
    #[serde(with = "duration")]
    pub failed: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        const DAY: u64 = 24 * 60 * 60;
        RetentionConfig {
            delivered: Duration::from_secs(30 * DAY),
            failed: Duration::from_secs(90 * DAY),
        }
    }
}

/// Custom retry policies beside the built-in ones (SPEC §6).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    pub policies: BTreeMap<String, PolicyConfig>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// `steps[0]` decides attempt 2, and so on.
    pub steps: Vec<StepConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    /// Counted from the end of the previous attempt.
    #[serde(with = "duration")]
    pub after: Duration,
    /// Codes (`"499"`), ranges (`"500-599"`), open ranges (`"300-"`); `None`: any failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A level (`info`) or a tracing filter (`info,sled=warn`).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Config {
    /// Loads the config. An explicit `path` must exist (the error names it); with `None`,
    /// `./dispatcher.toml` is read if it exists, else the built-in defaults are used. Environment
    /// overrides apply in both cases.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env = process_env()?;
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| match error.kind() {
                    io::ErrorKind::NotFound => ConfigError::NotFound {
                        path: path.to_path_buf(),
                    },
                    _ => ConfigError::Read {
                        path: path.to_path_buf(),
                        error,
                    },
                })?;
                parse(&text, &path.display().to_string(), &env)
            }
            None => match std::fs::read_to_string(DEFAULT_PATH) {
                Ok(text) => parse(&text, DEFAULT_PATH, &env),
                // No file is the normal development setup: the built-in defaults apply.
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    parse("", "built-in defaults", &env)
                }
                Err(error) => Err(ConfigError::Read {
                    path: PathBuf::from(DEFAULT_PATH),
                    error,
                }),
            },
        }
    }

    /// Parses a TOML string with the given environment variables (name, value) instead of the
    /// process environment; for tests and embedders.
    pub fn from_toml_str(toml: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
        parse(toml, "config", env)
    }

    /// Checks what serde cannot: ranges, non-empty strings, the retry policies, and that a daemon
    /// without tokens only listens on loopback. Done by every loader; call it on a `Config` built in
    /// code before handing it to the dispatcher.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.storage.path.as_os_str().is_empty() {
            return Err(ConfigError::invalid("storage.path", "must not be empty"));
        }

        if self.account.subdomain.trim().is_empty() {
            return Err(ConfigError::invalid(
                "account.subdomain",
                "must not be empty",
            ));
        }
        match &self.account.id {
            serde_json::Value::Number(_) => {}
            serde_json::Value::String(id) if !id.is_empty() => {}
            serde_json::Value::String(_) => {
                return Err(ConfigError::invalid("account.id", "must not be empty"));
            }
            _ => {
                return Err(ConfigError::invalid(
                    "account.id",
                    "must be a number or a string",
                ));
            }
        }
        if let Some(link) = &self.account.link {
            check_link(link).map_err(|message| ConfigError::invalid("account.link", message))?;
        }

        for (i, token) in self.api.tokens.iter().enumerate() {
            if token.token.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("api.tokens[{i}].token"),
                    "must not be empty",
                ));
            }
        }
        // SPEC §3: with no tokens every request is admin, which is only safe on loopback.
        if self.api.tokens.is_empty() && !self.server.listen.ip().is_loopback() {
            return Err(ConfigError::invalid(
                "server.listen",
                format!(
                    "{} is not a loopback address, and api.tokens is empty; without tokens \
                     every request is admin, so only a loopback address is allowed",
                    self.server.listen
                ),
            ));
        }
        if self.server.max_body == 0 {
            return Err(ConfigError::invalid(
                "server.max_body",
                "must be greater than zero",
            ));
        }

        for (key, value) in [
            ("limits.max_subscriptions", self.limits.max_subscriptions),
            ("limits.max_batch", self.limits.max_batch),
            ("delivery.concurrency", self.delivery.concurrency),
            ("delivery.per_subscription", self.delivery.per_subscription),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        if self.delivery.timeout.is_zero() {
            return Err(ConfigError::invalid(
                "delivery.timeout",
                "must be greater than zero",
            ));
        }
        check_user_agent(&self.delivery.user_agent())
            .map_err(|message| ConfigError::invalid("delivery.user_agent", message))?;
        if let Some(proxy) = &self.delivery.proxy {
            check_proxy(proxy)
                .map_err(|message| ConfigError::invalid("delivery.proxy", message))?;
        }

        Policies::from_config(&self.retry).map_err(policy_error)?;

        check_level(&self.log.level).map_err(|message| ConfigError::invalid("log.level", message))
    }

    /// The effective settings as TOML, every token (and a proxy password) replaced by `***`; what
    /// `dispatcher check-config` prints. The output parses back into the same config but for the
    /// masked values.
    pub fn to_masked_toml(&self) -> String {
        let mut masked = self.clone();
        for token in &mut masked.api.tokens {
            token.token = MASK.to_string();
        }
        if let Some(proxy) = &masked.delivery.proxy {
            masked.delivery.proxy = Some(masked_url(proxy));
        }
        // The link in effect, also when it is the default made from the subdomain.
        masked.account.link = Some(masked.account.link());
        match toml::to_string_pretty(&masked) {
            Ok(text) => text,
            // Only reachable for a config built in code (a non-UTF-8 path, a count above i64::MAX);
            // the caller prints this, so say what happened instead of panicking.
            Err(error) => format!("# the settings cannot be written as TOML: {error}\n"),
        }
    }

    /// The built-in plus custom retry policies.
    ///
    /// The policies were checked when the config was loaded; a `Config` assembled in code must go
    /// through [`Config::validate`] first, or a bad custom policy panics here.
    pub fn retry_policies(&self) -> Policies {
        Policies::from_config(&self.retry)
            .expect("retry policies are checked by Config::validate when the config is loaded")
    }
}

/// TOML text → table → environment overrides → `Config` → checks.
fn parse(text: &str, origin: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
    let mut table: toml::Table =
        text.parse()
            .map_err(|error: toml::de::Error| ConfigError::Syntax {
                origin: origin.to_string(),
                message: error.to_string().trim_end().to_string(),
            })?;
    let mut overrides = apply_env(&mut table, env)?;
    let config = deserialize(table, &mut overrides)?;
    config
        .validate()
        .map_err(|error| attribute(error, &overrides))?;
    Ok(config)
}

/// One `DISPATCHER_<SECTION>_<KEY>` variable applied to the table.
#[derive(Debug)]
struct EnvOverride {
    var: String,
    section: &'static str,
    key: String,
    raw: String,
    /// Whether the table holds `raw` as a plain string (rather than the TOML value it parsed as).
    as_string: bool,
}

impl EnvOverride {
    /// Whether an error at dotted `path` is about this override's key (or something inside it).
    fn covers(&self, path: &str) -> bool {
        let own = format!("{}.{}", self.section, self.key);
        match path.strip_prefix(&own) {
            Some(rest) => rest.is_empty() || rest.starts_with('.') || rest.starts_with('['),
            None => false,
        }
    }

    fn set(&self, table: &mut toml::Table, value: toml::Value) {
        let section = table
            .entry(self.section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        // A section that is not a table is the file's error; serde reports it, naming the section.
        if let toml::Value::Table(section) = section {
            section.insert(self.key.clone(), value);
        }
    }
}

/// The `DISPATCHER_` variables of the process. Other variables, and `DISPATCHER_` ones that are not
/// about a config section (`DISPATCHER_TOKEN` belongs to the CLI client), are not looked at.
fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().map(str::to_string) else {
            continue;
        };
        if env_target(&name).is_none() {
            continue;
        }
        let value = value
            .into_string()
            .map_err(|_: OsString| ConfigError::Env {
                var: name.clone(),
                message: "the value is not valid UTF-8".to_string(),
            })?;
        env.push((name, value));
    }
    Ok(env)
}

/// `DISPATCHER_DELIVERY_MAX_RETRY_AFTER` → `("delivery", "MAX_RETRY_AFTER")`; `None` for variables
/// that are not config overrides.
fn env_target(name: &str) -> Option<(&'static str, &str)> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    ENV_SECTIONS.iter().find_map(|&section| {
        let (head, key) = (rest.get(..section.len())?, rest.get(section.len()..)?);
        let key = key.strip_prefix('_')?;
        head.eq_ignore_ascii_case(section).then_some((section, key))
    })
}

/// Puts every override into the table, as the TOML value its text parses as, or as a string.
fn apply_env(
    table: &mut toml::Table,
    env: &[(String, String)],
) -> Result<Vec<EnvOverride>, ConfigError> {
    let mut sorted: Vec<&(String, String)> = env.iter().collect();
    // Sorted so that, with several bad overrides, the same one is reported every time.
    sorted.sort();
    let mut overrides = Vec::new();
    for (var, raw) in sorted {
        let Some((section, key)) = env_target(var) else {
            continue;
        };
        if key.is_empty() {
            return Err(ConfigError::Env {
                var: var.clone(),
                message: format!(
                    "no key after the section name (expected {ENV_PREFIX}{}_KEY)",
                    section.to_ascii_uppercase()
                ),
            });
        }
        let (value, as_string) = match raw.parse::<toml::Value>() {
            Ok(value) => {
                let is_string = value.is_str();
                (value, is_string)
            }
            // `127.0.0.1:9000`, `5m`, `/var/lib/x`: not TOML values, meant as strings.
            Err(_) => (toml::Value::String(raw.clone()), true),
        };
        let ov = EnvOverride {
            var: var.clone(),
            section,
            key: key.to_ascii_lowercase(),
            raw: raw.clone(),
            as_string,
        };
        ov.set(table, value);
        overrides.push(ov);
    }
    Ok(overrides)
}

/// serde, with a second chance for overrides: `DISPATCHER_ACCOUNT_SUBDOMAIN=123` parses as a TOML
/// integer, but the key wants a string, so the raw text is tried before giving up.
fn deserialize(
    mut table: toml::Table,
    overrides: &mut [EnvOverride],
) -> Result<Config, ConfigError> {
    let secrets = token_strings(&table, overrides);
    // The error each override's TOML value caused before it was retried as a plain string.
    let mut typed_errors: Vec<(usize, ConfigError)> = Vec::new();
    loop {
        let error = match serde_path_to_error::deserialize::<_, Config>(table.clone()) {
            Ok(config) => return Ok(config),
            Err(error) => error,
        };
        let path = error.path().to_string();
        let error = serde_error(&path, &redact(error.inner().message(), &secrets));
        // Each pass turns one more override into a string, so the loop ends.
        if let Some(index) = overrides
            .iter()
            .position(|ov| !ov.as_string && ov.covers(&path))
        {
            let ov = &mut overrides[index];
            ov.as_string = true;
            ov.set(&mut table, toml::Value::String(ov.raw.clone()));
            typed_errors.push((index, error));
            continue;
        }
        // When the raw text fails too, the TOML value's error is the useful one: for
        // `[{ token = "t", role = "root" }]` it is "unknown variant `root`", not "expected a sequence".
        let typed = overrides
            .iter()
            .position(|ov| ov.covers(&path))
            .and_then(|index| typed_errors.iter().position(|(i, _)| *i == index));
        let error = match typed {
            Some(at) => typed_errors.swap_remove(at).1,
            None => error,
        };
        return Err(attribute(error, overrides));
    }
}

/// Every string in the table that may be a token, so that serde messages (which quote the bad
/// value: `invalid type: string "…"`) never show one.
fn token_strings(table: &toml::Table, overrides: &[EnvOverride]) -> Vec<String> {
    let mut secrets: Vec<String> = overrides
        .iter()
        .filter(|ov| ov.section == "api")
        .map(|ov| ov.raw.clone())
        .collect();
    let tokens = table.get("api").and_then(|api| api.get("tokens"));
    let items = match tokens {
        Some(toml::Value::Array(items)) => items.iter().collect(),
        Some(other) => vec![other],
        None => Vec::new(),
    };
    for item in items {
        match item {
            toml::Value::String(token) => secrets.push(token.clone()),
            toml::Value::Table(entry) => {
                if let Some(toml::Value::String(token)) = entry.get("token") {
                    secrets.push(token.clone());
                }
            }
            _ => {}
        }
    }
    secrets.retain(|secret| !secret.is_empty());
    secrets
}

/// `message` with every quoted occurrence of a secret replaced by `"***"`.
fn redact(message: &str, secrets: &[String]) -> String {
    secrets.iter().fold(message.to_string(), |message, secret| {
        // serde quotes strings with `{:?}`; matching the quoted form leaves a short token's letters
        // elsewhere in the message alone.
        message.replace(&format!("{secret:?}"), &format!("{MASK:?}"))
    })
}

/// A serde message at `path` as a [`ConfigError`] naming the full key.
fn serde_error(path: &str, message: &str) -> ConfigError {
    // serde_path_to_error writes the root as ".".
    let path = if path == "." { "" } else { path };
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    if message.starts_with("unknown field") {
        // The path already ends with the unknown key itself.
        return ConfigError::UnknownKey {
            key: path.to_string(),
        };
    }
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        return ConfigError::invalid(join(field), "required key is missing");
    }
    let key = if path.is_empty() { "config" } else { path };
    ConfigError::invalid(key, message)
}

/// Names the environment variable when the error is about a key it overrode.
fn attribute(error: ConfigError, overrides: &[EnvOverride]) -> ConfigError {
    let Some(ov) = error
        .key()
        .and_then(|key| overrides.iter().find(|ov| ov.covers(key)))
    else {
        return error;
    };
    ConfigError::Env {
        var: ov.var.clone(),
        message: error.to_string(),
    }
}

/// A policy error as an error on its key: `retry.policies.NAME` or `…NAME.steps[i].on`.
fn policy_error(error: RetryError) -> ConfigError {
    match error {
        RetryError::InPolicy { name, source } => match *source {
            RetryError::InvalidStep { step, source } => ConfigError::invalid(
                format!("retry.policies.{name}.steps[{step}].on"),
                source.to_string(),
            ),
            other => ConfigError::invalid(format!("retry.policies.{name}"), other.to_string()),
        },
        other => ConfigError::invalid("retry.policies", other.to_string()),
    }
}

fn check_link(link: &str) -> Result<(), String> {
    let url = Url::parse(link).map_err(|error| format!("invalid URL: {error}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("must be an http(s) URL, not {:?}", url.scheme()));
    }
    Ok(())
}

fn check_proxy(proxy: &Url) -> Result<(), String> {
    if !matches!(proxy.scheme(), "http" | "https" | "socks5" | "socks5h") {
        return Err(format!(
            "unsupported proxy scheme {:?} (use http, https, socks5 or socks5h)",
            proxy.scheme()
        ));
    }
    if proxy.host_str().is_none_or(str::is_empty) {
        return Err("the proxy URL has no host".to_string());
    }
    Ok(())
}

/// What `reqwest` accepts as a header value: visible ASCII, spaces and tabs.
fn check_user_agent(user_agent: &str) -> Result<(), String> {
    if user_agent.trim().is_empty() {
        return Err("must not be empty".to_string());
    }
    if !user_agent
        .chars()
        .all(|c| c == ' ' || c == '\t' || c.is_ascii_graphic())
    {
        return Err("must be printable ASCII (it is sent as an HTTP header)".to_string());
    }
    Ok(())
}

/// A level word, or a comma-separated tracing filter whose parts are level words or
/// `target=level` directives (`info,sled=warn`).
fn check_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |word: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(word));
    if level.trim().is_empty() {
        return Err("must not be empty (use trace, debug, info, warn or error)".to_string());
    }
    for directive in level.split(',').map(str::trim) {
        if is_level(directive) {
            continue;
        }
        // A bare word would be read by tracing as a target name with every level on: a typo like
        // "inf" would silently log everything, so only `target=level` forms go to tracing's parser.
        if directive.contains('=')
            && directive
                .parse::<tracing_subscriber::filter::Directive>()
                .is_ok()
        {
            continue;
        }
        return Err(format!(
            "{directive:?} is not a level (trace, debug, info, warn, error, off) \
             or a target=level directive"
        ));
    }
    Ok(())
}

/// `url` with its password, if any, replaced by `***`.
fn masked_url(url: &Url) -> Url {
    let mut masked = url.clone();
    if masked.password().is_some() {
        // Fails only for URLs that cannot have credentials, and those have no password to hide.
        let _ = masked.set_password(Some(MASK));
    }
    masked
}

/// `account.id`: a number or a string, kept as the JSON value it will be sent as.
fn account_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<serde_json::Value, D::Error> {
    struct IdVisitor;
    impl Visitor<'_> for IdVisitor {
        type Value = serde_json::Value;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number or a string")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(v.into())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            serde_json::Number::from_f64(v)
                .map(serde_json::Value::Number)
                .ok_or_else(|| E::custom("must be a finite number"))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.into())
        }
    }
    deserializer.deserialize_any(IdVisitor)
}

/// `account.link`: `""` means unset, like `delivery.proxy`.
fn optional_link<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let link = String::deserialize(deserializer)?;
    let link = link.trim();
    if link.is_empty() {
        return Ok(None);
    }
    check_link(link).map_err(de::Error::custom)?;
    Ok(Some(link.to_string()))
}

/// Durations as humantime strings: `"150ms"`, `"5m"`, `"1h 30m"`, `"30d"`.
mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format(*value))
    }

    /// `"90d"`, `"1h 30m"`, `"150ms"`. Not `humantime::format_duration`: it counts in months of
    /// 30.44 days, so the default `"90d"` would come back as `"2months 29days 2h 52m 48s"`.
    pub fn format(value: Duration) -> String {
        if value.is_zero() {
            return "0s".to_string();
        }
        let secs = value.as_secs();
        let nanos = u64::from(value.subsec_nanos());
        let parts = [
            (secs / 86_400, "d"),
            (secs % 86_400 / 3600, "h"),
            (secs % 3600 / 60, "m"),
            (secs % 60, "s"),
            (nanos / 1_000_000, "ms"),
            (nanos / 1000 % 1000, "us"),
            (nanos % 1000, "ns"),
        ];
        parts
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, unit)| format!("{n}{unit}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"2s\", \"5m\" or \"1h 30m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                humantime::parse_duration(v.trim())
                    .map_err(|error| E::custom(format!("invalid duration {v:?}: {error}")))
            }
        }
        deserializer.deserialize_str(DurationVisitor)
    }
}

/// Byte sizes: an integer, or a string like `"1MiB"`, `"512KiB"`, `"2MB"`, `"100B"`, `"1 MiB"`.
mod byte_size {
    use super::*;

    const KIB: u64 = 1024;
    const KB: u64 = 1000;
    /// Binary units first so that the usual sizes print the way they are usually written.
    const UNITS: [(&str, u64); 9] = [
        ("TiB", KIB * KIB * KIB * KIB),
        ("GiB", KIB * KIB * KIB),
        ("MiB", KIB * KIB),
        ("KiB", KIB),
        ("TB", KB * KB * KB * KB),
        ("GB", KB * KB * KB),
        ("MB", KB * KB),
        ("KB", KB),
        ("B", 1),
    ];

    pub fn serialize<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        // A string rather than an integer: TOML integers stop at i64::MAX, and "1MiB" reads better.
        let (unit, size) = UNITS
            .iter()
            .find(|(_, size)| *value != 0 && value.is_multiple_of(*size))
            .copied()
            .unwrap_or(("B", 1));
        serializer.collect_str(&format_args!("{}{unit}", value / size))
    }

    pub fn parse(text: &str) -> Result<u64, String> {
        let text = text.trim();
        let digits_end = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits_end);
        let unit = unit.trim();
        let bad = || {
            format!(
                "invalid size {text:?}: expected a number of bytes or a size like \
                 \"1MiB\", \"512KiB\", \"2MB\" or \"100B\""
            )
        };
        let number: u64 = number.parse().map_err(|_| bad())?;
        let multiplier = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(unit))
                .map(|(_, size)| *size)
                .ok_or_else(bad)?
        };
        number
            .checked_mul(multiplier)
            .ok_or_else(|| format!("size {text:?} is too large"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = u64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of bytes or a size such as \"1MiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
                Ok(v)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
                u64::try_from(v).map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
                parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// `delivery.allow_private`: CIDRs, where a bare address means just that address (/32 or /128).
/// A single string (`"127.0.0.0/8"` or `"10.0.0.0/8, 127.0.0.1"`) is accepted too, which is what an
/// environment variable most naturally holds.
mod ip_nets {
    use super::*;

    pub fn serialize<S: Serializer>(value: &[IpNet], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(value.iter().map(ToString::to_string))
    }

    fn parse(text: &str) -> Result<IpNet, String> {
        let text = text.trim();
        text.parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                format!("invalid CIDR {text:?} (expected e.g. \"127.0.0.0/8\" or \"::1\")")
            })
    }

    /// One element of the list, so that serde_path_to_error reports its index.
    struct Net(IpNet);

    impl<'de> Deserialize<'de> for Net {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            let text = String::deserialize(deserializer)?;
            parse(&text).map(Net).map_err(de::Error::custom)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
        struct NetsVisitor;
        impl<'de> Visitor<'de> for NetsVisitor {
            type Value = Vec<IpNet>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of CIDRs such as [\"127.0.0.0/8\"]")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<IpNet>, A::Error> {
                let mut nets = Vec::new();
                while let Some(Net(net)) = seq.next_element()? {
                    nets.push(net);
                }
                Ok(nets)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<IpNet>, E> {
                v.split(',')
                    .filter(|part| !part.trim().is_empty())
                    .map(|part| parse(part).map_err(E::custom))
                    .collect()
            }
        }
        deserializer.deserialize_any(NetsVisitor)
    }
}

/// `delivery.proxy`: `""` (the default) means no proxy.
mod proxy_url {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Option<Url>, serializer: S) -> Result<S::Ok, S::Error> {
        // TOML has no null; "" is how the file says "none", so that is what is written back.
        serializer.serialize_str(value.as_ref().map_or("", Url::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Url>, D::Error> {
        let text = String::deserialize(deserializer)?;
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        // The URL itself stays out of the message: it may hold a password.
        let url = Url::parse(text)
            .map_err(|error| de::Error::custom(format!("invalid proxy URL: {error}")))?;
        check_proxy(&url).map_err(de::Error::custom)?;
        Ok(Some(url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::retry::RetryPolicy;

    const SPEC_EXAMPLE: &str = r#"
[server]
listen = "127.0.0.1:8080"
max_body = "1MiB"            # larger requests get 413

[storage]
path = "./data/dispatcher.sled"

[account]                    # the `account` block sent with every amoCRM-format payload
subdomain = "example"
id = 1                       # number or string; sent as configured
# link = "https://example.amocrm.ru"   (default: https://{subdomain}.amocrm.ru)

[api]
# tokens: role admin (everything), emitter (POST events), reader (every GET, the stream, /metrics).
tokens = [{ token = "s3cr3t-admin-token", role = "admin" }]

[limits]
max_subscriptions = 100      # active (enabled) subscriptions; amoCRM's limit
max_batch = 1000             # events in one intake request

[delivery]
timeout = "2s"               # per attempt (amoCRM expects an answer within 2 s)
concurrency = 512            # attempts in flight in all
per_subscription = 16        # attempts in flight to one subscription
user_agent = "webhook-dispatcher/{version}"
allow_private = []           # CIDRs allowed as destinations, e.g. ["127.0.0.0/8"]; all private,
proxy = ""                   # optional egress proxy (http:// or socks5://) for every attempt; with a
max_retry_after = "1h"       # a 429/503 Retry-After longer than the scheduled delay is honoured up to this

[disable]                    # amoCRM's rule: more than `threshold` failed attempts within `window`,
window = "2h"                # the latest failed too -> the subscription is disabled until re-enabled
threshold = 100

[retention]                  # delivery records kept after they end
delivered = "30d"
failed = "90d"

[retry.policies.my-policy]   # custom policies beside the built-in ones (section 6); `on` lists codes
steps = [ { after = "30s", on = ["0-99", "300-"] }, { after = "10m", on = ["500-599"] } ]

[log]
format = "text"              # or "json"
level = "info"
"#;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse_ok(toml: &str) -> Config {
        Config::from_toml_str(toml, &[]).unwrap_or_else(|e| panic!("{toml}\n-> {e}"))
    }

    fn parse_err(toml: &str) -> String {
        match Config::from_toml_str(toml, &[]) {
            Ok(config) => panic!("{toml}\n-> accepted: {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    fn with_env(toml: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_str(toml, &env(vars))
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn defaults_are_the_specs() {
        let c = Config::default();
        assert_eq!(
            c.server.listen,
            "127.0.0.1:8080".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(c.server.max_body, 1_048_576);
        assert_eq!(c.storage.path, PathBuf::from("./data/dispatcher.sled"));
        assert_eq!(c.account.subdomain, "example");
        assert_eq!(c.account.id, serde_json::json!(1));
        assert_eq!(c.account.link, None);
        assert_eq!(c.account.link(), "https://example.amocrm.ru");
        assert!(c.api.tokens.is_empty());
        assert_eq!(c.limits.max_subscriptions, 100);
        assert_eq!(c.limits.max_batch, 1000);
        assert_eq!(c.delivery.timeout, secs(2));
        assert_eq!(c.delivery.concurrency, 512);
        assert_eq!(c.delivery.per_subscription, 16);
        assert_eq!(c.delivery.user_agent, "webhook-dispatcher/{version}");
        assert_eq!(
            c.delivery.user_agent(),
            format!("webhook-dispatcher/{}", env!("CARGO_PKG_VERSION"))
        );
        assert!(c.delivery.allow_private.is_empty());
        assert_eq!(c.delivery.proxy, None);
        assert_eq!(c.delivery.max_retry_after, secs(3600));
        assert_eq!(c.disable.window, secs(2 * 3600));
        assert_eq!(c.disable.threshold, 100);
        assert_eq!(c.retention.delivered, secs(30 * 86400));
        assert_eq!(c.retention.failed, secs(90 * 86400));
        assert!(c.retry.policies.is_empty());
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.level, "info");
        c.validate().expect("defaults are valid");
        // An empty file and an absent file both mean the defaults.
        assert_eq!(parse_ok(""), c);
    }

    #[test]
    fn spec_example_parses() {
        let c = parse_ok(SPEC_EXAMPLE);
        assert_eq!(c.api.tokens.len(), 1);
        assert_eq!(c.api.tokens[0].token, "s3cr3t-admin-token");
        assert_eq!(c.api.tokens[0].role, Role::Admin);
        let policy = &c.retry.policies["my-policy"];
        assert_eq!(policy.steps.len(), 2);
        assert_eq!(policy.steps[0].after, secs(30));
        assert_eq!(
            policy.steps[1].on.as_deref(),
            Some(&["500-599".to_string()][..])
        );
        // Apart from the token and the policy, the example is the defaults.
        let mut expected = Config::default();
        expected.api.tokens = c.api.tokens.clone();
        expected.retry = c.retry.clone();
        assert_eq!(c, expected);

        let policies = c.retry_policies();
        assert_eq!(policies.names(), ["amocrm", "creatio", "once", "my-policy"]);
        let mine = policies.get("my-policy").expect("custom policy");
        assert_eq!(mine.max_attempts(), 3);
        assert_eq!(mine.next_delay(1, 404), Some(secs(30)));
        assert_eq!(mine.next_delay(2, 404), None);
        assert_eq!(mine.next_delay(2, 503), Some(secs(600)));
        assert_eq!(
            *policies.get("amocrm").expect("built-in"),
            RetryPolicy::amocrm()
        );
    }

    #[test]
    fn every_value_form() {
        let c = parse_ok(
            r#"
            [server]
            listen = "[::1]:9000"
            max_body = 2048
            [account]
            subdomain = "test"
            id = "7039099"
            link = "https://test.kommo.com"
            [api]
            tokens = [{ token = "a", role = "emitter" }, { token = "b", role = "reader" }]
            [delivery]
            timeout = "1h 30m"
            allow_private = ["127.0.0.0/8", "::1", "10.1.2.3"]
            proxy = "socks5h://user:pw@proxy.local:1080"
            [log]
            format = "json"
            level = "INFO,sled=warn"
            "#,
        );
        assert_eq!(c.server.max_body, 2048);
        assert_eq!(c.account.id, serde_json::json!("7039099"));
        assert_eq!(c.account.link(), "https://test.kommo.com");
        assert_eq!(c.api.tokens[1].role, Role::Reader);
        assert_eq!(c.delivery.timeout, secs(5400));
        let nets: Vec<String> = c
            .delivery
            .allow_private
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["127.0.0.0/8", "::1/128", "10.1.2.3/32"]);
        assert_eq!(c.delivery.proxy.as_ref().map(Url::scheme), Some("socks5h"));
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(
            !format!("{c:?}").contains("pw@"),
            "Debug shows the proxy password"
        );
    }

    #[test]
    fn durations_print_the_way_they_are_written() {
        for (text, printed) in [
            ("90d", "90d"),
            ("30d", "30d"),
            ("2h", "2h"),
            ("1h 30m", "1h 30m"),
            ("150ms", "150ms"),
            ("2s", "2s"),
            ("0s", "0s"),
            ("1d 1h 1m 1s 1ms 1us 1ns", "1d 1h 1m 1s 1ms 1us 1ns"),
        ] {
            let value = humantime::parse_duration(text).expect("valid duration");
            assert_eq!(duration::format(value), printed);
            assert_eq!(
                humantime::parse_duration(printed).ok(),
                Some(value),
                "{printed}"
            );
        }
    }

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("1MiB", 1_048_576),
            ("512KiB", 524_288),
            ("2MB", 2_000_000),
            ("100B", 100),
            ("1 MiB", 1_048_576),
            ("1mib", 1_048_576),
            ("4096", 4096),
            ("1GiB", 1 << 30),
        ] {
            assert_eq!(byte_size::parse(text), Ok(bytes), "{text}");
            let c = parse_ok(&format!("server.max_body = {text:?}"));
            assert_eq!(c.server.max_body, bytes);
            // And it prints back as something that reads back the same.
            let again = parse_ok(&c.to_masked_toml());
            assert_eq!(again.server.max_body, bytes, "{text}");
        }
        for bad in [
            "lots",
            "",
            "1.5MiB",
            "MiB",
            "-1",
            "1 M",
            "99999999999999999999TiB",
        ] {
            assert!(byte_size::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        for (toml, key) in [
            ("[delivery]\ntimout = \"5s\"", "delivery.timout"),
            ("[server]\nlistn = \"127.0.0.1:1\"", "server.listn"),
            ("[log]\ncolour = true", "log.colour"),
            ("[nope]\nx = 1", "nope"),
            (
                "[api]\ntokens = [{ token = \"t\", role = \"admin\", extra = 1 }]",
                "api.tokens[0].extra",
            ),
            (
                "[retry.policies.p]\nsteps = [{ after = \"1s\", when = [] }]",
                "retry.policies.p.steps[0].when",
            ),
        ] {
            let message = parse_err(toml);
            assert_eq!(message, format!("unknown key {key}"), "{toml}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        for (toml, key) in [
            ("server.listen = \"nope\"", "server.listen"),
            ("delivery.timeout = \"5 parsecs\"", "delivery.timeout"),
            ("delivery.timeout = \"0s\"", "delivery.timeout"),
            ("delivery.timeout = 5", "delivery.timeout"),
            ("server.max_body = \"lots\"", "server.max_body"),
            ("server.max_body = 0", "server.max_body"),
            (
                "api.tokens = [{ token = \"t\", role = \"root\" }]",
                "api.tokens[0].role",
            ),
            (
                "api.tokens = [{ token = \"\", role = \"admin\" }]",
                "api.tokens[0].token",
            ),
            ("api.tokens = [{ role = \"admin\" }]", "api.tokens[0].token"),
            ("log.format = \"xml\"", "log.format"),
            ("log.level = \"loud\"", "log.level"),
            ("log.level = \"info,sled=loud\"", "log.level"),
            (
                "delivery.allow_private = [\"10.0.0.0/8\", \"300.0.0.0/8\"]",
                "delivery.allow_private[1]",
            ),
            ("delivery.proxy = \"ftp://proxy:21\"", "delivery.proxy"),
            ("delivery.proxy = \"not a url\"", "delivery.proxy"),
            ("delivery.concurrency = 0", "delivery.concurrency"),
            ("delivery.per_subscription = 0", "delivery.per_subscription"),
            ("delivery.user_agent = \"\"", "delivery.user_agent"),
            ("limits.max_batch = 0", "limits.max_batch"),
            ("limits.max_subscriptions = -1", "limits.max_subscriptions"),
            ("account.id = true", "account.id"),
            ("account.id = [1]", "account.id"),
            ("account.subdomain = \"\"", "account.subdomain"),
            ("account.link = \"ftp://x\"", "account.link"),
            ("disable.window = \"forever\"", "disable.window"),
            ("retention.failed = \"\"", "retention.failed"),
            ("storage.path = \"\"", "storage.path"),
            ("server.listen = \"0.0.0.0:8080\"", "server.listen"),
            (
                "[retry.policies.p]\nsteps = [{ after = \"1s\" }, { after = \"1m\", on = [\"abc\"] }]",
                "retry.policies.p.steps[1].on",
            ),
            (
                "[retry.policies.p]\nsteps = [{ after = \"1s\", on = [] }]",
                "retry.policies.p.steps[0].on",
            ),
            (
                "[retry.policies.p]\nsteps = [{ on = [\"500\"] }]",
                "retry.policies.p.steps[0].after",
            ),
            (
                "[retry.policies.amocrm]\nsteps = []",
                "retry.policies.amocrm",
            ),
            ("[retry.policies.once]\nsteps = []", "retry.policies.once"),
            ("retry.policies = 5", "retry.policies"),
            ("server = 5", "server"),
        ] {
            let message = parse_err(toml);
            assert!(
                message.starts_with(&format!("{key}: ")),
                "{toml:?} -> {message:?} does not start with {key:?}"
            );
        }
        // A non-loopback listen address is fine once there are tokens.
        parse_ok(
            "server.listen = \"0.0.0.0:8080\"\napi.tokens = [{ token = \"t\", role = \"admin\" }]",
        );
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let message = parse_err("[server\nlisten = 1");
        assert!(message.starts_with("config: "), "{message}");
        assert!(message.contains("line 1"), "{message}");
    }

    #[test]
    fn env_overrides() {
        let c = with_env(
            "",
            &[
                ("DISPATCHER_SERVER_LISTEN", "127.0.0.1:9000"),
                ("DISPATCHER_LIMITS_MAX_BATCH", "10"),
                (
                    "DISPATCHER_DELIVERY_ALLOW_PRIVATE",
                    "[\"127.0.0.0/8\", \"::1\"]",
                ),
                ("DISPATCHER_DELIVERY_MAX_RETRY_AFTER", "10m"),
                ("DISPATCHER_SERVER_MAX_BODY", "2MiB"),
                ("DISPATCHER_LOG_LEVEL", "debug"),
                ("DISPATCHER_STORAGE_PATH", "/var/lib/dispatcher"),
                (
                    "DISPATCHER_API_TOKENS",
                    "[{ token = \"t\", role = \"reader\" }]",
                ),
                // Not overrides: the CLI's token, other programs' variables, retry policies.
                ("DISPATCHER_TOKEN", "whatever"),
                ("DISPATCHER_CONFIG", "/nope"),
                ("DISPATCHER_RETRY_POLICIES", "garbage"),
                ("HOME", "/root"),
            ],
        )
        .expect("overrides apply");
        assert_eq!(
            c.server.listen,
            "127.0.0.1:9000".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(c.limits.max_batch, 10);
        assert_eq!(c.delivery.allow_private.len(), 2);
        assert_eq!(c.delivery.max_retry_after, secs(600));
        assert_eq!(c.server.max_body, 2 * 1_048_576);
        assert_eq!(c.log.level, "debug");
        assert_eq!(c.storage.path, PathBuf::from("/var/lib/dispatcher"));
        assert_eq!(c.api.tokens[0].role, Role::Reader);
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        let c = with_env(
            "[server]\nlisten = \"127.0.0.1:1\"\n[limits]\nmax_batch = 5",
            &[("DISPATCHER_LIMITS_MAX_BATCH", "7")],
        )
        .expect("valid");
        assert_eq!(c.limits.max_batch, 7);
        assert_eq!(c.server.listen.port(), 1);
    }

    #[test]
    fn env_account_id_and_string_keys() {
        let id = |value: &str| {
            with_env("", &[("DISPATCHER_ACCOUNT_ID", value)])
                .expect("valid id")
                .account
                .id
        };
        assert_eq!(id("7039099"), serde_json::json!(7039099));
        assert_eq!(id("\"7039099\""), serde_json::json!("7039099"));
        assert_eq!(id("acc-1"), serde_json::json!("acc-1"));

        // Parses as a TOML integer / float / date, but the key wants a string: the raw text wins.
        for raw in ["123", "inf", "1979-05-27", "true"] {
            let c = with_env("", &[("DISPATCHER_ACCOUNT_SUBDOMAIN", raw)]).expect("string key");
            assert_eq!(c.account.subdomain, raw);
        }
        let c = with_env("", &[("DISPATCHER_DELIVERY_USER_AGENT", "42")]).expect("string key");
        assert_eq!(c.delivery.user_agent(), "42");
        // A single CIDR without TOML brackets.
        let c = with_env("", &[("DISPATCHER_DELIVERY_ALLOW_PRIVATE", "10.0.0.0/8")]).expect("cidr");
        assert_eq!(c.delivery.allow_private[0].to_string(), "10.0.0.0/8");
    }

    #[test]
    fn env_errors_name_the_variable() {
        for (var, value, mentions) in [
            ("DISPATCHER_SERVER_NOPE", "1", "unknown key server.nope"),
            (
                "DISPATCHER_SERVER_LISTEN",
                "nope",
                "server.listen: invalid socket address",
            ),
            ("DISPATCHER_SERVER_LISTEN", "0.0.0.0:80", "server.listen: "),
            (
                "DISPATCHER_LIMITS_MAX_BATCH",
                "0",
                "limits.max_batch: must be at least 1",
            ),
            ("DISPATCHER_LIMITS_MAX_BATCH", "many", "limits.max_batch: "),
            (
                "DISPATCHER_DELIVERY_TIMEOUT",
                "5 parsecs",
                "delivery.timeout: ",
            ),
            (
                "DISPATCHER_DELIVERY_ALLOW_PRIVATE",
                "[\"300.0.0.0/8\"]",
                "delivery.allow_private[0]: ",
            ),
            ("DISPATCHER_SERVER_", "1", "no key"),
        ] {
            let error = with_env("", &[(var, value)]).expect_err(var);
            let message = error.to_string();
            assert!(
                matches!(&error, ConfigError::Env { var: v, .. } if v == var),
                "{var}={value} -> {message}"
            );
            assert!(message.contains(mentions), "{var}={value} -> {message}");
        }
        // A file error is still the file's, even with an unrelated override present.
        let error = with_env(
            "server.listen = \"nope\"",
            &[("DISPATCHER_LIMITS_MAX_BATCH", "5")],
        )
        .expect_err("bad file");
        assert!(matches!(error, ConfigError::Invalid { .. }), "{error}");
    }

    #[test]
    fn env_errors_do_not_echo_tokens() {
        let error = with_env(
            "",
            &[(
                "DISPATCHER_API_TOKENS",
                "[{ token = \"sekrit\", role = \"root\" }]",
            )],
        )
        .expect_err("bad role");
        let message = error.to_string();
        assert!(message.contains("DISPATCHER_API_TOKENS"), "{message}");
        assert!(message.contains("api.tokens[0].role"), "{message}");
        assert!(!message.contains("sekrit"), "{message}");
    }

    #[test]
    fn value_errors_do_not_echo_tokens() {
        let message = parse_err("api.tokens = \"sekrit\"");
        assert!(message.starts_with("api.tokens: "), "{message}");
        assert!(!message.contains("sekrit"), "{message}");
        let message = parse_err("api.tokens = [\"sekrit\"]");
        assert!(message.starts_with("api.tokens[0]: "), "{message}");
        assert!(!message.contains("sekrit"), "{message}");
        let error = with_env("", &[("DISPATCHER_API_TOKENS", "sekrit")]).expect_err("not a list");
        assert!(!error.to_string().contains("sekrit"), "{error}");
    }

    #[test]
    fn masked_toml_hides_secrets_and_reparses() {
        let mut c = parse_ok(SPEC_EXAMPLE);
        c.delivery.proxy = Some(Url::parse("http://me:hunter2@proxy.local:3128").expect("url"));
        c.delivery.allow_private = vec!["127.0.0.0/8".parse().expect("net")];
        c.account.id = serde_json::json!("7039099");
        c.account.link = Some("https://test.amocrm.ru".to_string());
        c.api.tokens.push(TokenConfig {
            token: "second-token".to_string(),
            role: Role::Emitter,
        });
        let text = c.to_masked_toml();
        assert!(!text.contains("s3cr3t-admin-token"), "{text}");
        assert!(!text.contains("second-token"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains(MASK), "{text}");

        let back = parse_ok(&text);
        let mut expected = c.clone();
        for token in &mut expected.api.tokens {
            token.token = MASK.to_string();
        }
        expected.delivery.proxy = back.delivery.proxy.clone();
        expected.account.link = Some(c.account.link());
        assert_eq!(back, expected, "{text}");
        assert!(!format!("{c:?}").contains("s3cr3t"), "Debug shows a token");

        // The defaults print and read back too (no proxy, no policies; the link in effect).
        let defaults = Config::default().to_masked_toml();
        let mut expected = Config::default();
        expected.account.link = Some(expected.account.link());
        assert_eq!(parse_ok(&defaults), expected, "{defaults}");
    }

    #[test]
    fn env_target_recognises_sections() {
        assert_eq!(
            env_target("DISPATCHER_SERVER_LISTEN"),
            Some(("server", "LISTEN"))
        );
        assert_eq!(
            env_target("DISPATCHER_DELIVERY_MAX_RETRY_AFTER"),
            Some(("delivery", "MAX_RETRY_AFTER"))
        );
        assert_eq!(env_target("DISPATCHER_TOKEN"), None);
        assert_eq!(env_target("DISPATCHER_SERVER"), None);
        assert_eq!(env_target("DISPATCHER_RETRY_POLICIES"), None);
        assert_eq!(env_target("OTHER_SERVER_LISTEN"), None);
    }

    #[test]
    fn load_from_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.toml");
        let error = Config::load(Some(&missing)).expect_err("missing file");
        assert!(matches!(error, ConfigError::NotFound { .. }));
        assert!(error.to_string().contains("missing.toml"), "{error}");

        let path = dir.path().join("dispatcher.toml");
        std::fs::write(&path, "[limits]\nmax_batch = 3\n").expect("write");
        assert_eq!(Config::load(Some(&path)).expect("load").limits.max_batch, 3);

        std::fs::write(&path, "[limits\n").expect("write");
        let error = Config::load(Some(&path)).expect_err("syntax");
        assert!(error.to_string().contains("dispatcher.toml"), "{error}");
    }
}
