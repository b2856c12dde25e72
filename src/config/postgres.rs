//! `postgres.url`: parsed into tokio_postgres settings and the libpq TLS parameters the relay
//! reads itself (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`), and redacted for logs. Nothing
//! here reads a file: the `tls` module turns [`PostgresTls`] into connectors.

use std::path::PathBuf;

use super::error::invalid;
use super::{Config, ConfigError};

/// libpq's `sslmode`, applied to both Postgres connections (the `tls` module builds the connectors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// `disable`: plain TCP only.
    Disable,
    /// `prefer`, libpq's default (and `allow`): TLS without verification when the server offers
    /// it, plain TCP when it does not.
    #[default]
    Prefer,
    /// `require`: TLS or no connection; the certificate is not verified.
    Require,
    /// `verify-ca`: TLS, and a trusted CA signed the server's certificate.
    VerifyCa,
    /// `verify-full`: `verify-ca`, and the certificate names the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS settings of `postgres.url`: libpq's `sslmode`, `sslrootcert`, `sslcert` and
/// `sslkey`, which the relay reads itself because tokio-postgres knows only the first, and only
/// three of its values.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PostgresTls {
    /// The mode in force. As in libpq, `require` with an `sslrootcert` file verifies the CA
    /// (`verify-ca`), `sslrootcert=system` without a mode means `verify-full`, and every mode
    /// is `disable` when all hosts are Unix sockets (Postgres has no TLS there).
    pub mode: SslMode,
    /// The PEM file of the CAs trusted to sign the server's certificate; `None` (no
    /// `sslrootcert`, or `sslrootcert=system`) trusts the system's CA bundle.
    pub root_cert: Option<PathBuf>,
    /// A client certificate chain and its private key (PEM files), from `sslcert` and `sslkey`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl Config {
    /// The Postgres connection settings, parsed by `tokio_postgres` (which accepts `postgres://`
    /// URLs and libpq `key=value` strings). The TLS parameters it does not know are taken out
    /// first ([`Config::postgres_tls`] has them) and its `ssl_mode` set to match: `disable`,
    /// `prefer`, or `require` for the verifying modes. The error never contains the password.
    pub fn postgres_config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        parse_postgres_url(self.postgres.url.expose()).map(|(config, _)| config)
    }

    /// The TLS settings of `postgres.url`, for both connections.
    pub fn postgres_tls(&self) -> Result<PostgresTls, ConfigError> {
        parse_postgres_url(self.postgres.url.expose()).map(|(_, tls)| tls)
    }
}

const POSTGRES_URL_FIELD: &str = "postgres.url";

/// The libpq TLS parameters the relay takes out of `postgres.url` before tokio_postgres sees it.
const TLS_PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Parses `postgres.url` into tokio_postgres settings and the TLS settings.
pub(super) fn parse_postgres_url(
    url: &str,
) -> Result<(tokio_postgres::Config, PostgresTls), ConfigError> {
    let (rest, params) = split_tls_params(url).unwrap_or_else(|| (url.to_owned(), Vec::new()));
    let mut config = rest
        .parse::<tokio_postgres::Config>()
        .map_err(|_| invalid(POSTGRES_URL_FIELD, url_error_reason(url)))?;
    if config.get_hosts().is_empty() {
        return Err(invalid(POSTGRES_URL_FIELD, "must name a host"));
    }
    if config.get_user().is_none() {
        return Err(invalid(POSTGRES_URL_FIELD, "must name a user"));
    }
    let unix_only = config
        .get_hosts()
        .iter()
        .all(|host| !matches!(host, tokio_postgres::config::Host::Tcp(_)));
    let tls = tls_settings(&params, unix_only)?;
    config.ssl_mode(match tls.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    Ok((config, tls))
}

/// The TLS settings from the parameters [`split_tls_params`] took out (later ones win, as in
/// libpq; an empty value is no value).
fn tls_settings(params: &[(&str, String)], unix_only: bool) -> Result<PostgresTls, ConfigError> {
    let value = |key: &str| {
        params
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let mode = match value("sslmode") {
        None => None,
        Some("disable") => Some(SslMode::Disable),
        Some("allow" | "prefer") => Some(SslMode::Prefer),
        Some("require") => Some(SslMode::Require),
        Some("verify-ca") => Some(SslMode::VerifyCa),
        Some("verify-full") => Some(SslMode::VerifyFull),
        Some(other) => {
            return Err(invalid(
                POSTGRES_URL_FIELD,
                format!(
                    "must be a postgres:// URL or a libpq key=value string; sslmode {other:?} \
                     is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ),
            ))
        }
    };
    let system_roots = value("sslrootcert") == Some("system");
    let root_cert = value("sslrootcert")
        .filter(|_| !system_roots)
        .map(PathBuf::from);
    let mut mode = match (mode, system_roots) {
        // libpq: sslrootcert=system asks for verify-full, and refuses weaker modes.
        (None, true) => SslMode::VerifyFull,
        (Some(mode), true) if mode != SslMode::VerifyFull && mode != SslMode::Disable => {
            return Err(invalid(
                POSTGRES_URL_FIELD,
                format!(
                    "must not combine sslrootcert=system with sslmode={} (use verify-full)",
                    mode.as_str()
                ),
            ))
        }
        (mode, _) => mode.unwrap_or_default(),
    };
    // libpq: "if a root CA file exists, sslmode=require behaves like verify-ca".
    if mode == SslMode::Require && root_cert.is_some() {
        mode = SslMode::VerifyCa;
    }
    if unix_only {
        mode = SslMode::Disable;
    }
    let client_cert = match (value("sslcert"), value("sslkey")) {
        (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                POSTGRES_URL_FIELD,
                "sets sslcert without sslkey: a client certificate needs both",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                POSTGRES_URL_FIELD,
                "sets sslkey without sslcert: a client certificate needs both",
            ))
        }
    };
    Ok(PostgresTls {
        mode,
        root_cert,
        client_cert,
    })
}

/// Takes the [`TLS_PARAMS`] out of a connection string: the rest, and the `(key, value)` pairs
/// taken (decoded), in order. `None` if a `key=value` string cannot be tokenised; tokio_postgres
/// then gets the whole string and says what is wrong.
fn split_tls_params(url: &str) -> Option<(String, Vec<(&'static str, String)>)> {
    let tls_param = |key: &[u8]| TLS_PARAMS.into_iter().find(|p| p.as_bytes() == key);
    let mut taken = Vec::new();
    let Some(query) = url_query_start(url) else {
        let mut rest = String::with_capacity(url.len());
        let mut last = 0;
        for (key, value) in keyword_pairs(url)? {
            if let Some(param) = tls_param(url[key.clone()].as_bytes()) {
                taken.push((param, keyword_value(&url[value.clone()])));
                rest.push_str(&url[last..key.start]);
                last = value.end;
            }
        }
        rest.push_str(&url[last..]);
        return Some((rest, taken));
    };
    let Some(query) = query else {
        return Some((url.to_owned(), taken));
    };
    let mut kept = Vec::new();
    for param in url[query..].split('&') {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        match tls_param(&percent_decode(key)) {
            Some(name) => taken.push((
                name,
                String::from_utf8_lossy(&percent_decode(value)).into_owned(),
            )),
            None => kept.push(param),
        }
    }
    let mut rest = url[..query - 1].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Some((rest, taken))
}

/// For a `postgres://` URL, `Some` of where its query starts (after the `?`), if it has one;
/// `None` for a `key=value` string. Found the way [`password_spans`] reads URLs.
fn url_query_start(url: &str) -> Option<Option<usize>> {
    let prefix = ["postgres://", "postgresql://"]
        .iter()
        .find(|prefix| url.starts_with(*prefix))?;
    let start = prefix.len();
    let after_credentials = url[start..].find('@').map_or(start, |at| start + at + 1);
    Some(
        url[after_credentials..]
            .find('?')
            .map(|question| after_credentials + question + 1),
    )
}

/// A `key=value` string's value as tokio_postgres reads it: quotes removed, `\\x` is `x`.
fn keyword_value(raw: &str) -> String {
    let inner = raw
        .strip_prefix('\'')
        .and_then(|r| r.strip_suffix('\''))
        .unwrap_or(raw);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// Why `url` does not parse, without the password: the parser's complaint about the redacted
/// string, unless even that could echo part of the secret.
fn url_error_reason(url: &str) -> String {
    const BASE: &str = "must be a postgres:// URL or a libpq key=value string";
    let (Some(redacted), Some(secrets)) = (redact_connection_string(url), password_spans(url))
    else {
        return format!("{BASE}; check its quoting (a value with spaces goes in single quotes)");
    };
    // The TLS parameters are the relay's to read: without them the parser sees what it would.
    let redacted = split_tls_params(&redacted).map_or(redacted, |(rest, _)| rest);
    let Err(err) = redacted.parse::<tokio_postgres::Config>() else {
        // The redacted form parses, so the problem is inside the password itself.
        return format!("{BASE}; check the escaping of the password");
    };
    let mut detail = String::new();
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(&err);
    while let Some(err) = cause {
        detail = format!("{detail}: {err}");
        cause = err.source();
    }
    let leaks = secrets
        .iter()
        .any(|span| detail.contains(&url[span.clone()]));
    if detail.is_empty() || leaks {
        BASE.to_owned()
    } else {
        format!("{BASE}{detail}")
    }
}

/// `url` with every password replaced by `***`, or `None` if it cannot be tokenised safely.
pub(super) fn redact_connection_string(url: &str) -> Option<String> {
    let spans = password_spans(url)?;
    let mut out = String::with_capacity(url.len());
    let mut last = 0;
    for span in spans {
        out.push_str(&url[last..span.start]);
        out.push_str("***");
        last = span.end;
    }
    out.push_str(&url[last..]);
    Some(out)
}

/// Byte ranges of password values in a connection string, found the way `tokio_postgres` finds
/// them: the text between the first ':' and the first '@' of a URL, `password=` URL query
/// parameters, and `password` in `key=value` strings. `None` if a `key=value` string cannot be
/// tokenised (an unterminated quote, say), in which case nothing of it is safe to show.
fn password_spans(url: &str) -> Option<Vec<std::ops::Range<usize>>> {
    let prefix = ["postgres://", "postgresql://"]
        .iter()
        .find(|prefix| url.starts_with(*prefix));
    let Some(prefix) = prefix else {
        return keyword_password_spans(url);
    };
    let mut spans = Vec::new();
    let start = prefix.len();
    let rest = &url[start..];
    let after_credentials = match rest.find('@') {
        Some(at) => {
            if let Some(colon) = rest[..at].find(':') {
                spans.push(start + colon + 1..start + at);
            }
            start + at + 1
        }
        None => start,
    };
    if let Some(question) = url[after_credentials..].find('?') {
        let mut position = after_credentials + question + 1;
        for param in url[position..].split('&') {
            if let Some((key, _)) = param.split_once('=') {
                if percent_decode(key) == b"password" {
                    spans.push(position + key.len() + 1..position + param.len());
                }
            }
            position += param.len() + 1;
        }
    }
    Some(spans)
}

/// `password` values of a libpq `key = value` string.
fn keyword_password_spans(text: &str) -> Option<Vec<std::ops::Range<usize>>> {
    Some(
        keyword_pairs(text)?
            .into_iter()
            .filter(|(key, _)| &text[key.clone()] == "password")
            .map(|(_, value)| value)
            .collect(),
    )
}

/// `(key, raw value)` byte ranges.
type KeywordPairs = Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>;

/// The `(key, raw value)` byte ranges of a libpq `key = value` string, following
/// `tokio_postgres`'s tokeniser (Unicode whitespace separates, `\\` escapes the next character,
/// `'...'` quotes). `None` if it cannot be tokenised (an unterminated quote, a missing `=`).
fn keyword_pairs(text: &str) -> Option<KeywordPairs> {
    let mut chars = text.char_indices().peekable();
    let mut pairs = Vec::new();
    loop {
        while chars.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
        let key_start = chars.peek().map_or(text.len(), |&(i, _)| i);
        while chars
            .next_if(|&(_, c)| !c.is_whitespace() && c != '=')
            .is_some()
        {}
        let key_end = chars.peek().map_or(text.len(), |&(i, _)| i);
        if key_start == key_end {
            // tokio_postgres stops at the first empty keyword, too.
            return Some(pairs);
        }
        while chars.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
        chars.next_if(|&(_, c)| c == '=')?;
        while chars.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
        let value_start = chars.peek().map_or(text.len(), |&(i, _)| i);
        if chars.next_if(|&(_, c)| c == '\'').is_some() {
            loop {
                match chars.next()? {
                    (_, '\\') => {
                        chars.next();
                    }
                    (_, '\'') => break,
                    _ => {}
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|&(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    chars.next();
                }
            }
        }
        let value_end = chars.peek().map_or(text.len(), |&(i, _)| i);
        pairs.push((key_start..key_end, value_start..value_end));
    }
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testing::{validate_err, with_url};
    use super::super::*;
    use super::*;

    #[test]
    fn postgres_url_errors_never_show_the_password() {
        let cases = [
            "postgres://relay:hunter2@db:notaport/app",
            "postgres://relay:hunter2@[db/app",
            "host=db user=relay password=hunter2 port=x",
            "host=db user=relay password='hunter2",
            "host=db user=relay password=hunter2 bogus",
            "postgres://relay@db/app?password=hunter2&sslmode=sometimes",
        ];
        for url in cases {
            let err = validate_err(|c| c.postgres.url = Secret::new(url));
            assert!(err.starts_with("postgres.url must be"), "{url}: {err}");
            assert!(!err.contains("hunter2"), "{url}: {err}");
        }
        // The parser's complaint is kept when it is safe: it says which option is wrong.
        let err = validate_err(|c| c.postgres.url = Secret::new(cases[0]));
        assert!(err.contains("port"), "{err}");
        let err = validate_err(|c| c.postgres.url = Secret::new("postgres://relay:pw@/app"));
        assert_eq!(err, "postgres.url must name a host");
        let err = validate_err(|c| c.postgres.url = Secret::new("host=db dbname=app"));
        assert_eq!(err, "postgres.url must name a user");
    }

    #[test]
    fn postgres_config_accepts_urls_and_key_value_strings() {
        let mut config = Config::default();
        config.postgres.url =
            Secret::new("postgresql://relay:s%40cret@db1:5433,db2/app?sslmode=require");
        let pg = config.postgres_config().unwrap();
        assert_eq!(pg.get_user(), Some("relay"));
        assert_eq!(pg.get_password(), Some(&b"s@cret"[..]));
        assert_eq!(pg.get_ports(), [5433, 5432]);
        assert_eq!(pg.get_dbname(), Some("app"));
        config.postgres.url = Secret::new("host=/var/run/postgresql user=relay dbname=app");
        assert_eq!(config.postgres_config().unwrap().get_dbname(), Some("app"));
    }

    fn tls(url: &str) -> PostgresTls {
        with_url(url).postgres_tls().unwrap()
    }

    fn tokio_ssl_mode(url: &str) -> tokio_postgres::config::SslMode {
        with_url(url).postgres_config().unwrap().get_ssl_mode()
    }

    #[test]
    fn tls_parameters_are_read_from_urls() {
        use tokio_postgres::config::SslMode as Tokio;
        let url = "postgres://relay:pw@db/app?application_name=x&sslmode=verify-full\
                   &sslrootcert=%2Ftmp%2Fmy%20ca.pem&sslcert=/c.pem&sslkey=/k.pem";
        assert_eq!(
            tls(url),
            PostgresTls {
                mode: SslMode::VerifyFull,
                root_cert: Some("/tmp/my ca.pem".into()),
                client_cert: Some(("/c.pem".into(), "/k.pem".into())),
            }
        );
        // What tokio_postgres cannot parse is gone; the rest is still there.
        let pg = with_url(url).postgres_config().unwrap();
        assert_eq!(pg.get_ssl_mode(), Tokio::Require);
        assert_eq!(pg.get_application_name(), Some("x"));
        assert_eq!(pg.get_password(), Some(&b"pw"[..]));

        // libpq's default is prefer, and so is ours; allow is served by prefer.
        for url in [
            "postgres://relay@db/app",
            "postgres://relay@db/app?sslmode=prefer",
            "postgres://relay@db/app?sslmode=allow",
            "postgres://relay@db/app?sslmode=",
        ] {
            assert_eq!(tls(url), PostgresTls::default(), "{url}");
            assert_eq!(tokio_ssl_mode(url), Tokio::Prefer, "{url}");
        }
        let url = "postgres://relay@db/app?sslmode=disable&sslrootcert=/ca.pem";
        assert_eq!(tls(url).mode, SslMode::Disable);
        assert_eq!(tokio_ssl_mode(url), Tokio::Disable);
        let url = "postgres://relay@db/app?sslmode=require";
        assert_eq!(tls(url).mode, SslMode::Require);
        assert_eq!(tokio_ssl_mode(url), Tokio::Require);
        // Later parameters win, as in libpq.
        let url = "postgres://relay@db/app?sslmode=disable&sslmode=verify-ca";
        assert_eq!(tls(url).mode, SslMode::VerifyCa);
    }

    #[test]
    fn tls_parameters_are_read_from_key_value_strings() {
        let url = "host=db user=relay password='a b' sslmode = verify-ca \
                   sslrootcert='/my dir/ca.pem' dbname=app sslcert=/c\\ d.pem sslkey=/k.pem";
        assert_eq!(
            tls(url),
            PostgresTls {
                mode: SslMode::VerifyCa,
                root_cert: Some("/my dir/ca.pem".into()),
                client_cert: Some(("/c d.pem".into(), "/k.pem".into())),
            }
        );
        let pg = with_url(url).postgres_config().unwrap();
        assert_eq!(pg.get_dbname(), Some("app"));
        assert_eq!(pg.get_password(), Some(&b"a b"[..]));
    }

    #[test]
    fn tls_modes_follow_libpq() {
        // require with a CA file verifies the CA.
        let url = "postgres://relay@db/app?sslmode=require&sslrootcert=/ca.pem";
        assert_eq!(tls(url).mode, SslMode::VerifyCa);
        // sslrootcert=system means the system's CAs, verify-full unless said otherwise.
        let url = "postgres://relay@db/app?sslrootcert=system";
        assert_eq!(
            tls(url),
            PostgresTls {
                mode: SslMode::VerifyFull,
                root_cert: None,
                client_cert: None,
            }
        );
        let err = validate_err(|c| {
            c.postgres.url =
                Secret::new("postgres://relay@db/app?sslmode=require&sslrootcert=system")
        });
        assert_eq!(
            err,
            "postgres.url must not combine sslrootcert=system with sslmode=require (use verify-full)"
        );
        // Postgres has no TLS on Unix sockets; libpq ignores sslmode there.
        let url = "host=/var/run/postgresql user=relay sslmode=verify-full";
        assert_eq!(tls(url).mode, SslMode::Disable);
    }

    #[test]
    fn tls_parameter_errors() {
        let err = validate_err(|c| {
            c.postgres.url =
                Secret::new("postgres://relay:hunter2@db/app?sslmode=verify-everything")
        });
        assert!(err.starts_with("postgres.url must be"), "{err}");
        assert!(err.contains("\"verify-everything\" is not one of"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = validate_err(|c| {
            c.postgres.url = Secret::new("postgres://relay@db/app?sslcert=/c.pem")
        });
        assert_eq!(
            err,
            "postgres.url sets sslcert without sslkey: a client certificate needs both"
        );
        let err = validate_err(|c| c.postgres.url = Secret::new("host=db user=u sslkey=/k.pem"));
        assert_eq!(
            err,
            "postgres.url sets sslkey without sslcert: a client certificate needs both"
        );
        // The parser's complaint about the rest survives the TLS parameters.
        let err = validate_err(|c| {
            c.postgres.url =
                Secret::new("postgres://relay:hunter2@db:notaport/app?sslmode=verify-full")
        });
        assert!(err.contains("port") && !err.contains("sslmode"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn redacted_urls() {
        let cases = [
            (
                "postgres://relay:hunter2@db:5432/app",
                "postgres://relay:***@db:5432/app",
            ),
            ("postgresql://relay@db/app", "postgresql://relay@db/app"),
            ("postgres://relay:@db/app", "postgres://relay:***@db/app"),
            (
                "postgres://relay:a:b/c?d@db/app?password=x&sslmode=require",
                "postgres://relay:***@db/app?password=***&sslmode=require",
            ),
            (
                "postgres://db/app?pass%77ord=x",
                "postgres://db/app?pass%77ord=***",
            ),
            (
                "postgres://relay:pw@db/app?sslmode=verify-full&sslrootcert=/ca.pem",
                "postgres://relay:***@db/app?sslmode=verify-full&sslrootcert=/ca.pem",
            ),
            (
                "host=db user=relay password=hunter2 dbname=app",
                "host=db user=relay password=*** dbname=app",
            ),
            (
                "password = 'it\\'s secret' host=db",
                "password = *** host=db",
            ),
            ("password='it''s' host=db", "***"),
            ("password=abc\\ def host=db", "password=*** host=db"),
            ("host=db password='unterminated", "***"),
            ("", ""),
        ];
        for (url, expected) in cases {
            let postgres = PostgresConfig {
                url: Secret::new(url),
            };
            assert_eq!(postgres.redacted_url(), expected, "{url}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn url_parser_never_panics(text in "(postgres://|host=)?\\PC{0,120}") {
                let _ = parse_postgres_url(&text);
                let _ = url_error_reason(&text);
            }

            #[test]
            fn redaction_hides_url_passwords(
                user in "[a-z]{1,8}",
                password in "PW[A-Za-z0-9:/?=%!$*]{0,16}",
                host in "[a-z]{1,8}",
                query in proptest::bool::ANY,
            ) {
                let (url, expected) = if query {
                    (
                        format!("postgres://{user}@{host}/db?password={password}"),
                        format!("postgres://{user}@{host}/db?password=***"),
                    )
                } else {
                    (
                        format!("postgres://{user}:{password}@{host}/db"),
                        format!("postgres://{user}:***@{host}/db"),
                    )
                };
                let postgres = PostgresConfig { url: Secret::new(url) };
                prop_assert_eq!(postgres.redacted_url(), expected);
                let debug = format!("{postgres:?}");
                prop_assert!(!debug.contains("PW"), "{}", debug);
            }

            #[test]
            fn redaction_hides_key_value_passwords(
                password in "PW[A-Za-z0-9 '\\\\=]{0,16}",
                quoted in proptest::bool::ANY,
            ) {
                let value = if quoted {
                    format!("'{}'", password.replace('\\', "\\\\").replace('\'', "\\'"))
                } else {
                    password.replace('\\', "\\\\").replace(' ', "\\ ").replace('\'', "\\'")
                };
                let url = format!("host=db password={value} user=u");
                let postgres = PostgresConfig { url: Secret::new(url.clone()) };
                prop_assert_eq!(postgres.redacted_url(), "host=db password=*** user=u");
                // The escaping above is what tokio_postgres reads back, so the span redacted is
                // exactly the password it would send.
                let mut config = Config::default();
                config.postgres.url = Secret::new(url);
                let parsed = config.postgres_config();
                prop_assert!(parsed.is_ok());
                if let Ok(parsed) = parsed {
                    prop_assert_eq!(parsed.get_password(), Some(password.as_bytes()));
                }
            }
        }
    }
}
