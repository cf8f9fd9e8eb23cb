//! Shared by the generator tests: the shipped configs, promtool, and temporary files.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use nsm_core::Config;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every config in config/, as (path relative to the repository, parsed config).
pub fn shipped_configs() -> Vec<(String, Config)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(repo_root().join("config"))
        .expect("config/ is readable")
        .map(|entry| entry.expect("config/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 4,
        "config/ holds the shipped configs: {paths:?}"
    );
    paths
        .into_iter()
        .map(|path| {
            let name = format!(
                "config/{}",
                path.file_name().expect("file name").to_string_lossy()
            );
            (name, load(&path))
        })
        .collect()
}

pub fn load(path: &Path) -> Config {
    let text = std::fs::read_to_string(path).expect("config readable");
    Config::from_toml(&text, &|_| Some(String::new()))
        .unwrap_or_else(|errors| panic!("{}: {errors}", path.display()))
}

/// promtool from Debian's `prometheus` package. Missing promtool fails the test: the
/// Makefile installs it (`make deps`), and a silent skip would prove nothing.
pub fn promtool() -> PathBuf {
    for candidate in ["/usr/bin/promtool", "/usr/local/bin/promtool"] {
        if Path::new(candidate).is_file() {
            return PathBuf::from(candidate);
        }
    }
    if let Ok(output) = Command::new("promtool").arg("--version").output() {
        if output.status.success() {
            return PathBuf::from("promtool");
        }
    }
    panic!(
        "promtool not found: it comes with Debian's `prometheus` package, which `make test` \
         installs (make deps); install it with `apt-get install prometheus`"
    );
}

/// Runs promtool with `args`, panicking with its output when it fails.
pub fn run_promtool(args: &[&str], what: &str) -> String {
    let output = Command::new(promtool())
        .args(args)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {args:?} failed on {what}:\n{text}"
    );
    text
}

/// Parses a config text, panicking with its problems.
pub fn load_text(text: &str) -> Config {
    Config::from_toml(text, &|_| Some(String::new()))
        .unwrap_or_else(|errors| panic!("config: {errors}"))
}
