//! Log setup: human text or JSON lines, on standard error.

use anyhow::{Context, Result};
use tracing_subscriber::EnvFilter;

pub fn init(format: &str, filter: &str) -> Result<()> {
    let filter =
        EnvFilter::try_new(filter).with_context(|| format!("invalid log filter {filter:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|error| anyhow::anyhow!("cannot set up logging: {error}"))
}
