//! Helpers shared by the config's unit tests.

use super::{Config, ConfigError, Secret};

pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn load(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_parts(Some(text), env(vars))
}

pub fn load_err(text: &str, vars: &[(&str, &str)]) -> String {
    match load(text, vars) {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(err) => err.to_string(),
    }
}

pub fn validate_err(change: impl FnOnce(&mut Config)) -> String {
    let mut config = Config::default();
    change(&mut config);
    match config.validate() {
        Ok(()) => panic!("expected a validation error for {config:?}"),
        Err(err) => err.to_string(),
    }
}

pub fn with_url(url: &str) -> Config {
    let mut config = Config::default();
    config.postgres.url = Secret::new(url);
    config
}
