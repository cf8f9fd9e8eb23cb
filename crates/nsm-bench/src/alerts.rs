//! `nsm-bench alerts`: puts the alerting confusion table (what each scenario of the promtool
//! scenario library paged, and when) into BENCHMARKS.md, in a section of its own that
//! `nsm-bench report` keeps when it rewrites the rest.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

#[derive(Args)]
pub struct AlertsArgs {
    /// The table `cargo test --test promtool` wrote (`NSM_ALERT_REPORT`).
    #[arg(long)]
    table: PathBuf,
    /// The command that produced it, quoted in the report.
    #[arg(long, default_value = "make alert-report")]
    command: String,
    /// The file to put it in.
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
}

const START: &str = "<!-- alerting: written by make alert-report -->";
const END: &str = "<!-- alerting: end -->";

pub fn run(args: &AlertsArgs) -> anyhow::Result<()> {
    let table = std::fs::read_to_string(&args.table)
        .with_context(|| format!("cannot read {}", args.table.display()))?;
    let section = format!(
        "{START}\n## Alerting: what pages, and when\n\n\
         Measured by `{}` on {}, {}: every scenario of `crates/nsm-gen/tests/scenario` (nine \
         weeks of nsm's exported series, weekly windows) through `promtool test rules` against \
         the rules generated from each example config. Times are event time after the \
         scenario's onset, at promtool's evaluation step; B is a business alert, P a pipeline \
         alert. \"NOT met\" rows are the issue's targets not reached yet.\n\n{}\n{END}\n",
        args.command,
        crate::report::today(),
        crate::report::machine(),
        table.trim_end()
    );
    let existing = std::fs::read_to_string(&args.output).unwrap_or_default();
    let text = with_section(&existing, &section);
    std::fs::write(&args.output, text)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!("wrote the alerting section of {}", args.output.display());
    Ok(())
}

/// The alerting section of a BENCHMARKS.md, if it has one, markers included.
pub fn section_of(text: &str) -> Option<&str> {
    let start = text.find(START)?;
    let end = text[start..].find(END)? + start + END.len();
    Some(&text[start..end])
}

/// `text` with its alerting section replaced by `section`, or `section` appended.
fn with_section(text: &str, section: &str) -> String {
    match section_of(text) {
        Some(old) => text.replacen(old, section.trim_end(), 1),
        None if text.is_empty() => section.to_string(),
        None => format!("{}\n\n{section}", text.trim_end()),
    }
}

/// Reads the alerting section kept in `path`, to carry over a rewrite.
pub fn kept_section(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    section_of(&text).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_replaced_in_place_or_appended() {
        let section = format!("{START}\nnew\n{END}\n");
        assert_eq!(with_section("# B\n", &section), format!("# B\n\n{section}"));
        let old = format!("# B\n\n{START}\nold\n{END}\n\n## After\n");
        assert_eq!(
            with_section(&old, &section),
            format!("# B\n\n{START}\nnew\n{END}\n\n## After\n")
        );
    }
}
