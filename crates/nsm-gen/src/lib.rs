//! Generated operations assets: the Prometheus rule file (`nsm rules`) and the Grafana
//! dashboard (`nsm dashboards`) of a config.
//!
//! Pure functions from a validated [`Config`](nsm_core::Config) to text, like SLO generators
//! (Sloth, Pyrra): one config in, a complete "do not edit" file out. This crate must never do
//! I/O or read the clock; the binary writes the files. It only reads the series nsm exports
//! (listed in `nsm-http`'s `telemetry.rs`), so a rename there must be made here too: the
//! `promtool test rules` tests feed exactly those series.

mod dashboard;
mod promql;
mod rules;

pub use dashboard::dashboard;
pub use rules::{rules, rules_scaled};
