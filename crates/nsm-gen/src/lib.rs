//! Generated operations assets: the Prometheus rule file (`nsm rules`) and the Grafana
//! dashboard (`nsm dashboards`) of a config.
//!
//! Pure functions from a validated [`Config`](nsm_core::Config) to text, like SLO generators
//! (Sloth, Pyrra): one config in, a complete "do not edit" file out. This crate must never do
//! I/O or read the clock; the binary writes the files. It only reads the series nsm exports
//! (`nsm_core::series`): a unit test below checks that every series a rule or panel names is
//! one of them.

mod dashboard;
mod promql;
mod rules;

pub use dashboard::dashboard;
pub use rules::{rules, rules_scaled};

#[cfg(test)]
mod tests {
    use nsm_core::Config;

    /// Every config the repository ships.
    const CONFIGS: [(&str, &str); 5] = [
        ("example", include_str!("../../../config/example.toml")),
        (
            "collaboration",
            include_str!("../../../config/collaboration.toml"),
        ),
        (
            "support-chatbot",
            include_str!("../../../config/support-chatbot.toml"),
        ),
        (
            "marketplace",
            include_str!("../../../config/marketplace.toml"),
        ),
        ("deploy", include_str!("../../../deploy/nsm.toml")),
    ];

    /// The `nsm_...` words of a text.
    fn series_named(text: &str) -> Vec<&str> {
        let mut names = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("nsm_") {
            let before = text.len() - rest.len() + at;
            let word = &rest[at..];
            let end = word
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(word.len());
            let preceded_by_word = text[..before]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
            if !preceded_by_word {
                names.push(&word[..end]);
            }
            rest = &word[end..];
        }
        names
    }

    #[test]
    fn every_series_a_rule_or_panel_names_is_one_nsm_exports() {
        for (name, text) in CONFIGS {
            let config = Config::from_toml(text, &|_| Some("set".to_string()))
                .unwrap_or_else(|errors| panic!("{name}: {errors}"));
            let rules = crate::rules(&config, name);
            let dashboard = crate::dashboard(&config, name);
            let mut named = 0;
            for word in series_named(&rules)
                .into_iter()
                .chain(series_named(&dashboard))
            {
                // The value of a label saying why the pipeline alert fires.
                if word == "nsm_down" {
                    continue;
                }
                assert!(
                    nsm_core::series::of_sample(word).is_some(),
                    "{name}: {word} is named by a rule or panel but nsm exports no such series"
                );
                named += 1;
            }
            assert!(named > 50, "{name}: {named} series named");
        }
    }

    #[test]
    fn a_series_nsm_does_not_export_is_caught() {
        assert_eq!(
            series_named("sum(rate(nsm_events_consumd_total[5m])) / nsm:x"),
            ["nsm_events_consumd_total"]
        );
        assert!(nsm_core::series::of_sample("nsm_events_consumd_total").is_none());
    }
}
