//! `nsm rules` and `nsm dashboards`: read a config, write what `nsm-gen` makes of it.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use nsm_core::config::Resolver;
use nsm_core::Config;

#[derive(Debug, clap::Args)]
pub struct AssetArgs {
    /// The TOML config file to generate from.
    #[arg(long, short, env = "NSM_CONFIG")]
    config: PathBuf,
    /// Write here instead of standard output (replaced atomically).
    #[arg(long, short)]
    output: Option<PathBuf>,
}

/// `nsm rules`: the config and output, and the time scale of accelerated-time tests.
#[derive(Debug, clap::Args)]
pub struct RulesArgs {
    #[command(flatten)]
    common: AssetArgs,
    /// Divide every window-derived duration of the business rules (growth look-back,
    /// sustained ranges, `for`, hold-back) by this, for event time replayed this many times
    /// faster than the wall clock (end-to-end tests, demos). Never in production.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    time_scale: u32,
}

/// `nsm rules`.
pub fn write_rules(args: RulesArgs) -> Result<()> {
    let scale = args.time_scale;
    write(args.common, |config, source| {
        nsm_gen::rules_scaled(config, source, scale)
    })
}

/// Loads the config and writes `generate(config, source)` to the output.
pub fn write(args: AssetArgs, generate: impl Fn(&Config, &str) -> String) -> Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("cannot read config file {}", args.config.display()))?;
    // Generated files never contain Kafka properties, so an unset `${VAR}` or an absent
    // `${file:PATH}` secret must not stop a CI job that generates rules without the
    // production environment.
    let config = Config::from_toml_with(
        &text,
        &Resolver {
            env: &|name| Some(std::env::var(name).unwrap_or_default()),
            file: &|_| Ok("unread".to_string()),
        },
    )
    .map_err(|errors| anyhow!("{}: {errors}", args.config.display()))?;
    let source = args.config.display().to_string();
    let generated = generate(&config, &source);
    match &args.output {
        None => std::io::stdout()
            .lock()
            .write_all(generated.as_bytes())
            .context("cannot write to standard output")?,
        Some(path) => {
            let directory = path
                .parent()
                .filter(|parent| !parent.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let mut file = tempfile::NamedTempFile::new_in(directory)
                .with_context(|| format!("cannot write in {}", directory.display()))?;
            file.write_all(generated.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            file.persist(path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(())
}
