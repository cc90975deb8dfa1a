//! Checks on recipe values that no stage kind should have to repeat.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// The first float in a stage table (nested tables, arrays and matrix values included)
/// that is NaN or infinite: (dotted key, span, the value as written).
///
/// No stage setting means anything with such a value: a NaN gate compares false with
/// everything, an infinite one passes or fails everything, and a bound placeholder
/// would poison the graph. Rejecting them here keeps every stage kind, present and
/// future, from having to.
pub fn non_finite_float(table: &DeTable<'_>) -> Option<(String, Range<usize>, String)> {
    let mut stack: Vec<(String, &Spanned<DeValue<'_>>)> = table
        .iter()
        .map(|(k, v)| (k.get_ref().to_string(), v))
        .collect();
    stack.reverse();
    while let Some((key, v)) = stack.pop() {
        match v.get_ref() {
            DeValue::Float(f) => {
                let finite = f.as_str().parse::<f64>().is_ok_and(|x| x.is_finite());
                if !finite {
                    return Some((key, v.span(), f.as_str().to_string()));
                }
            }
            DeValue::Array(a) => {
                stack.extend(a.iter().rev().map(|e| (key.clone(), e)));
            }
            DeValue::Table(t) => {
                let mut items: Vec<_> = t
                    .iter()
                    .map(|(k, e)| (format!("{key}.{}", k.get_ref()), e))
                    .collect();
                items.reverse();
                stack.extend(items);
            }
            _ => {}
        }
    }
    None
}

/// Whether `s` may name a stage or a pipeline: letters, digits, `_`, `-` and `.`.
///
/// Pipeline names end up in file names (refs in the cache, the out_dir manifest) and
/// in Markdown and HTML reports, so they follow the same rule as stage ids.
pub fn is_simple_id(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}
