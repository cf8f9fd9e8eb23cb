//! Whether an event passes a metric's `where`: every test on its field holds.

use crate::decimal::Decimal;
use crate::event::{Fields, Scalar, Slot};
use crate::metric::{Comparison, Literal, Test};

/// A filter as the engine runs it: the slot of each tested field, and its test.
pub(crate) type CompiledFilter = Vec<(Slot, Test)>;

pub(super) fn matches(filter: &[(Slot, Test)], fields: &Fields<'_>) -> bool {
    filter
        .iter()
        .all(|(slot, test)| passes(test, fields.get(*slot).as_ref()))
}

/// Whether `value` (`None`: the field is absent) passes `test`. JSON null is taken as absent.
fn passes(test: &Test, value: Option<&Scalar<'_>>) -> bool {
    let value = value.filter(|value| !matches!(value, Scalar::Null));
    match (test, value) {
        (Test::Missing, value) => value.is_none(),
        (Test::NoneOf(values), None) => !values.is_empty(),
        (_, None) => false,
        (Test::Present, Some(_)) => true,
        (Test::AnyOf(values), Some(value)) => values.iter().any(|literal| equal(literal, value)),
        (Test::NoneOf(values), Some(value)) => !values.iter().any(|literal| equal(literal, value)),
        (Test::Compare(comparison, bound), Some(Scalar::Number(text))) => Decimal::parse(text)
            .is_ok_and(|number| match comparison {
                Comparison::Greater => number > *bound,
                Comparison::AtLeast => number >= *bound,
                Comparison::Less => number < *bound,
                Comparison::AtMost => number <= *bound,
            }),
        (Test::Prefix(prefix), Some(Scalar::Text(text))) => text.starts_with(prefix.as_str()),
        (Test::Compare(..) | Test::Prefix(_), Some(_)) => false,
    }
}

/// Equality of a JSON value and a literal of the same type; numbers by their exact value
/// (`10` equals `10.0`).
fn equal(literal: &Literal, value: &Scalar<'_>) -> bool {
    match (literal, value) {
        (Literal::Text(expected), Scalar::Text(actual)) => expected == actual,
        (Literal::Bool(expected), Scalar::Bool(actual)) => expected == actual,
        (Literal::Number(expected), Scalar::Number(actual)) => {
            Decimal::parse(actual).is_ok_and(|number| number == *expected)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    fn number(text: &str) -> Decimal {
        Decimal::parse(text).expect("decimal")
    }

    #[test]
    fn each_test_on_present_absent_and_null_values() {
        let text = |t: &'static str| Some(Scalar::Text(Cow::Borrowed(t)));
        let amount = Some(Scalar::Number("12.5"));
        let internal = Test::NoneOf(vec![Literal::Text("internal".into())]);
        assert!(passes(&internal, text("customer").as_ref()));
        assert!(!passes(&internal, text("internal").as_ref()));
        assert!(
            passes(&internal, None),
            "no plan field is not an excluded plan"
        );
        assert!(passes(&internal, Some(&Scalar::Null)));

        let at_least_ten = Test::Compare(Comparison::AtLeast, number("10"));
        assert!(passes(&at_least_ten, amount.as_ref()));
        assert!(passes(&at_least_ten, Some(&Scalar::Number("10.00"))));
        assert!(!passes(&at_least_ten, Some(&Scalar::Number("9.99"))));
        assert!(
            !passes(&at_least_ten, text("12").as_ref()),
            "a string is no number"
        );
        assert!(!passes(&at_least_ten, None));
        assert!(passes(
            &Test::Compare(Comparison::Greater, number("12")),
            amount.as_ref()
        ));
        assert!(!passes(
            &Test::Compare(Comparison::Less, number("12.5")),
            amount.as_ref()
        ));
        assert!(passes(
            &Test::Compare(Comparison::AtMost, number("12.5")),
            amount.as_ref()
        ));

        assert!(passes(&Test::Present, amount.as_ref()));
        assert!(!passes(&Test::Present, Some(&Scalar::Null)));
        assert!(passes(&Test::Missing, None));
        assert!(passes(&Test::Missing, Some(&Scalar::Null)));
        assert!(!passes(&Test::Missing, amount.as_ref()));

        let test_users = Test::Prefix("test-".into());
        assert!(passes(&test_users, text("test-42").as_ref()));
        assert!(!passes(&test_users, text("user-42").as_ref()));
        assert!(!passes(&test_users, Some(&Scalar::Number("42"))));
    }
}
