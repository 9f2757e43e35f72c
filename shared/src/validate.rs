//! Validation that collects every problem at once, each with a field path
//! such as `routes[3].paths[0]: must start with '/'`.

use std::fmt;

use serde::Serialize;

/// One problem in a piece of configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// Path of the offending field, e.g. `paths[0]` or `routes[3].paths[0]`.
    #[schema(example = "paths[0]")]
    pub field: String,
    /// What is wrong with it.
    #[schema(example = "must start with '/'")]
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Every problem found in one piece of configuration; never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, Default, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for error in &self.0 {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// Collects problems while walking a value, tracking the current field path.
#[derive(Debug, Default)]
pub struct Collector {
    prefix: String,
    errors: Vec<FieldError>,
}

impl Collector {
    /// A collector whose paths all start with `prefix` (empty for a top-level resource).
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            errors: Vec::new(),
        }
    }

    /// Records a problem at `field`, relative to the current prefix.
    pub fn push(&mut self, field: impl AsRef<str>, message: impl Into<String>) {
        let field = field.as_ref();
        let full = match (self.prefix.is_empty(), field.is_empty()) {
            (true, _) => field.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) if field.starts_with('[') => format!("{}{field}", self.prefix),
            (false, false) => format!("{}.{field}", self.prefix),
        };
        self.errors.push(FieldError {
            field: full,
            message: message.into(),
        });
    }

    /// Runs `f` with `segment` appended to the path (`"upstream"` or `"[3]"`).
    pub fn nested(&mut self, segment: &str, f: impl FnOnce(&mut Collector)) {
        let saved = self.prefix.clone();
        self.prefix = match (saved.is_empty(), segment.starts_with('[')) {
            (true, _) => segment.to_string(),
            (false, true) => format!("{saved}{segment}"),
            (false, false) => format!("{saved}.{segment}"),
        };
        f(self);
        self.prefix = saved;
    }

    /// `Ok` when nothing was recorded, otherwise every recorded problem.
    pub fn finish(self) -> Result<(), ValidationErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.errors))
        }
    }
}

/// A configuration value that can check itself.
pub trait Validate {
    /// Records every problem of `self` into `errors`.
    fn check(&self, errors: &mut Collector);

    /// Every problem of `self`, with paths relative to the value itself.
    fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Collector::default();
        self.check(&mut errors);
        errors.finish()
    }
}

/// Longest name accepted for any named resource.
pub const MAX_NAME_LEN: usize = 128;

/// Names of resources: 1..=128 characters from `[A-Za-z0-9._~-]`, so they are safe in URL paths.
pub fn check_name(errors: &mut Collector, field: &str, name: &str) {
    if name.is_empty() {
        errors.push(field, "must not be empty");
    } else if name.len() > MAX_NAME_LEN {
        errors.push(field, format!("must be at most {MAX_NAME_LEN} characters"));
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-'))
    {
        errors.push(
            field,
            "may contain only letters, digits and '.', '_', '~', '-'",
        );
    }
}

/// A count that must be strictly positive and at most `max`.
pub fn check_positive(errors: &mut Collector, field: &str, value: i64, max: i64) {
    if value <= 0 {
        errors.push(field, format!("must be greater than 0 (got {value})"));
    } else if value > max {
        errors.push(field, format!("must be at most {max} (got {value})"));
    }
}

/// Reports entries of `items` that appear more than once.
pub fn check_unique<'a>(
    errors: &mut Collector,
    field: &str,
    items: impl IntoIterator<Item = &'a str>,
) {
    let mut seen = std::collections::BTreeSet::new();
    for (i, item) in items.into_iter().enumerate() {
        if !seen.insert(item) {
            errors.push(format!("{field}[{i}]"), format!("duplicate entry '{item}'"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_compose_with_prefix_and_nesting() {
        let mut errors = Collector::with_prefix("routes[3]");
        errors.push("paths[0]", "must start with '/'");
        errors.nested("rate_limit", |e| e.push("requests", "bad"));
        errors.nested("[1]", |e| e.push("", "whole"));
        let err = errors.finish().expect_err("errors were pushed");
        assert_eq!(
            err.to_string(),
            "routes[3].paths[0]: must start with '/'; routes[3].rate_limit.requests: bad; routes[3][1]: whole"
        );
    }

    #[test]
    fn names() {
        let check = |name: &str| {
            let mut errors = Collector::default();
            check_name(&mut errors, "name", name);
            errors.finish().is_ok()
        };
        assert!(check("users-v2.internal_~"));
        assert!(!check(""));
        assert!(!check("has space"));
        assert!(!check("slash/y"));
        assert!(!check(&"a".repeat(129)));
    }
}
