//! `where` (and a conversion's `from`): a table of field paths, each with the values it may
//! have or a table of tests.
//!
//! ```toml
//! where = { event = "payment_succeeded", "properties.plan" = ["pro", "business"],
//!           "user.email" = { not_any_of = ["qa@example.com"] }, "properties.amount" = { gte = 10 },
//!           "user.id" = { prefix = "test-", }, coupon = { present = false } }
//! ```

use std::collections::BTreeMap;

use super::Problems;
use crate::decimal::Decimal;
use crate::metric::{Clause, Comparison, Condition, FieldPath, Filter, FilterField, Literal, Test};

/// The tests a table value may hold.
const TESTS: &str = "any_of, not, not_any_of, gt, gte, lt, lte, present, prefix";

pub(super) fn parse_filter(
    path: &str,
    table: Option<&BTreeMap<String, toml::Value>>,
    problems: &mut Problems,
) -> Filter {
    let mut filter = Filter::default();
    for (key, value) in table.into_iter().flatten() {
        let clause_path = format!("{path}.{key}");
        let field = if key == "event" {
            Some(FilterField::EventName)
        } else {
            FieldPath::parse(key).map(FilterField::Path)
        };
        let Some(field) = field else {
            problems.add(clause_path, "invalid field path");
            continue;
        };
        match value {
            toml::Value::Table(tests) => {
                if tests.is_empty() {
                    problems.add(
                        clause_path.clone(),
                        format!("an empty table tests nothing; use one of {TESTS}"),
                    );
                }
                for (name, argument) in tests {
                    let test_path = format!("{clause_path}.{name}");
                    if let Some(test) = parse_test(&test_path, name, argument, problems) {
                        match test {
                            Test::AnyOf(any_of) => filter.clauses.push(Clause {
                                field: field.clone(),
                                any_of,
                            }),
                            test => filter.conditions.push(Condition {
                                field: field.clone(),
                                test,
                            }),
                        }
                    }
                }
            }
            values => {
                if let Some(any_of) = literals(&clause_path, values, problems) {
                    filter.clauses.push(Clause { field, any_of });
                }
            }
        }
    }
    filter
}

fn parse_test(
    path: &str,
    name: &str,
    argument: &toml::Value,
    problems: &mut Problems,
) -> Option<Test> {
    let mut comparison = |comparison: Comparison| match number(argument) {
        Some(bound) => Some(Test::Compare(comparison, bound)),
        None => {
            problems.add(path, format!("expected a number, found {argument}"));
            None
        }
    };
    match name {
        "any_of" => literals(path, argument, problems).map(Test::AnyOf),
        "not" | "not_any_of" => literals(path, argument, problems).map(Test::NoneOf),
        "gt" => comparison(Comparison::Greater),
        "gte" => comparison(Comparison::AtLeast),
        "lt" => comparison(Comparison::Less),
        "lte" => comparison(Comparison::AtMost),
        "present" => match argument {
            toml::Value::Boolean(true) => Some(Test::Present),
            toml::Value::Boolean(false) => Some(Test::Missing),
            other => {
                problems.add(
                    path,
                    format!("expected true (present and not null) or false (missing or null), found {other}"),
                );
                None
            }
        },
        "prefix" => match argument {
            toml::Value::String(prefix) if !prefix.is_empty() => Some(Test::Prefix(prefix.clone())),
            other => {
                problems.add(path, format!("expected a non-empty string, found {other}"));
                None
            }
        },
        other => {
            problems.add(
                path,
                format!("unknown test {other:?}; expected one of {TESTS}"),
            );
            None
        }
    }
}

/// One value or a list of them.
fn literals(path: &str, value: &toml::Value, problems: &mut Problems) -> Option<Vec<Literal>> {
    let values: Vec<&toml::Value> = match value {
        toml::Value::Array(values) => values.iter().collect(),
        single => vec![single],
    };
    let mut parsed = Vec::new();
    for value in values {
        match literal(value) {
            Some(literal) => parsed.push(literal),
            None => problems.add(
                path,
                "expected a string, number or boolean, or a list of them",
            ),
        }
    }
    if parsed.is_empty() {
        problems.add(path, "an empty list matches nothing");
        return None;
    }
    Some(parsed)
}

fn number(value: &toml::Value) -> Option<Decimal> {
    match literal(value)? {
        Literal::Number(number) => Some(number),
        _ => None,
    }
}

pub(super) fn literal(value: &toml::Value) -> Option<Literal> {
    match value {
        toml::Value::String(text) => Some(Literal::Text(text.clone())),
        toml::Value::Integer(number) => Some(Literal::Number(Decimal::from_integer(*number))),
        toml::Value::Float(number) => Decimal::parse(&number.to_string())
            .ok()
            .map(Literal::Number),
        toml::Value::Boolean(flag) => Some(Literal::Bool(*flag)),
        _ => None,
    }
}
