//! Knative-style attribute filters: exact, prefix, suffix, all, any, not.

use crate::config::Filter;
use crate::event::attribute;
use cloudevents::Event;

/// A filter ready to evaluate.
#[derive(Debug, Clone)]
pub enum CompiledFilter {
    /// Attribute equals value.
    Exact(Vec<(String, String)>),
    /// Attribute starts with value.
    Prefix(Vec<(String, String)>),
    /// Attribute ends with value.
    Suffix(Vec<(String, String)>),
    /// All match.
    All(Vec<CompiledFilter>),
    /// One matches.
    Any(Vec<CompiledFilter>),
    /// Does not match.
    Not(Box<CompiledFilter>),
}

impl CompiledFilter {
    /// Checks the filter's shape (non-empty attribute maps, valid attribute names).
    pub fn compile(f: &Filter) -> Result<CompiledFilter, String> {
        fn pairs(
            kind: &str,
            m: &std::collections::BTreeMap<String, String>,
        ) -> Result<Vec<(String, String)>, String> {
            if m.is_empty() {
                return Err(format!("`{kind}` filter needs at least one attribute, e.g. `{kind}: {{type: com.example.alert}}`"));
            }
            for k in m.keys() {
                if k.is_empty()
                    || !k
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                {
                    return Err(format!(
                        "`{kind}` filter: `{k}` is not a CloudEvents attribute name (lowercase letters and digits)"
                    ));
                }
            }
            Ok(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        }
        let list = |fs: &Vec<Filter>| {
            fs.iter()
                .map(CompiledFilter::compile)
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(match f {
            Filter::Exact(m) => CompiledFilter::Exact(pairs("exact", m)?),
            Filter::Prefix(m) => CompiledFilter::Prefix(pairs("prefix", m)?),
            Filter::Suffix(m) => CompiledFilter::Suffix(pairs("suffix", m)?),
            Filter::All(fs) => CompiledFilter::All(list(fs)?),
            Filter::Any(fs) => CompiledFilter::Any(list(fs)?),
            Filter::Not(f) => CompiledFilter::Not(Box::new(CompiledFilter::compile(f)?)),
        })
    }

    /// Whether the event passes.
    pub fn matches(&self, e: &Event) -> bool {
        let each = |p: &[(String, String)], f: &dyn Fn(&str, &str) -> bool| {
            p.iter()
                .all(|(k, v)| attribute(e, k).is_some_and(|a| f(&a, v)))
        };
        match self {
            CompiledFilter::Exact(p) => each(p, &|a, v| a == v),
            CompiledFilter::Prefix(p) => each(p, &|a, v| a.starts_with(v)),
            CompiledFilter::Suffix(p) => each(p, &|a, v| a.ends_with(v)),
            CompiledFilter::All(fs) => fs.iter().all(|f| f.matches(e)),
            CompiledFilter::Any(fs) => fs.iter().any(|f| f.matches(e)),
            CompiledFilter::Not(f) => !f.matches(e),
        }
    }
}

impl CompiledFilter {
    /// AMQP topic binding keys that every event this filter matches is routed by (its type
    /// is the routing key), or `None` when the filter does not narrow the type.
    pub fn type_bindings(&self) -> Option<Vec<String>> {
        let usable = |v: &str| !v.is_empty() && !v.contains(['*', '#']) && v.len() <= 255;
        match self {
            CompiledFilter::Exact(pairs) => pairs
                .iter()
                .find(|(k, v)| k == "type" && usable(v))
                .map(|(_, v)| vec![v.clone()]),
            CompiledFilter::Prefix(pairs) => pairs
                .iter()
                .find(|(k, v)| k == "type" && usable(v))
                .and_then(|(_, v)| {
                    // `#` matches any number of words, so the words before the last dot
                    // that the prefix holds whole are enough.
                    let whole = &v[..v.rfind('.')? + 1];
                    Some(vec![format!("{whole}#")])
                }),
            CompiledFilter::All(fs) => fs.iter().find_map(CompiledFilter::type_bindings),
            CompiledFilter::Any(fs) => {
                let mut out = Vec::new();
                for f in fs {
                    out.extend(f.type_bindings()?);
                }
                (!out.is_empty()).then_some(out)
            }
            CompiledFilter::Suffix(_) | CompiledFilter::Not(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudevents::{EventBuilder, EventBuilderV10};

    fn f(yaml: &str) -> CompiledFilter {
        let raw: Filter = serde_saphyr::from_str(yaml).unwrap();
        CompiledFilter::compile(&raw).unwrap()
    }

    fn ev() -> Event {
        EventBuilderV10::new()
            .id("1")
            .source("/vc/1")
            .ty("com.vmware.vsphere.VmPoweredOffEvent.v0")
            .subject("VmPoweredOffEvent")
            .extension("eventclass", "event")
            .build()
            .unwrap()
    }

    #[test]
    fn each_kind() {
        assert!(f("exact: {type: com.vmware.vsphere.VmPoweredOffEvent.v0}").matches(&ev()));
        assert!(!f("exact: {type: x}").matches(&ev()));
        assert!(f("prefix: {type: com.vmware.vsphere.}").matches(&ev()));
        assert!(f("suffix: {type: .v0, subject: Event}").matches(&ev()));
        assert!(!f("suffix: {type: .v1}").matches(&ev()));
        assert!(f("exact: {eventclass: event}").matches(&ev()));
        assert!(!f("exact: {missing: x}").matches(&ev()));
        assert!(f("all: [{prefix: {type: com.}}, {exact: {source: /vc/1}}]").matches(&ev()));
        assert!(!f("all: [{prefix: {type: com.}}, {exact: {source: /vc/2}}]").matches(&ev()));
        assert!(f("any: [{exact: {type: nope}}, {exact: {source: /vc/1}}]").matches(&ev()));
        assert!(f("not: {exact: {type: nope}}").matches(&ev()));
        assert!(!f("not: {prefix: {type: com}}").matches(&ev()));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let raw: Filter = serde_saphyr::from_str("exact: {}").unwrap();
        assert!(CompiledFilter::compile(&raw)
            .unwrap_err()
            .contains("at least one"));
        let raw: Filter = serde_saphyr::from_str("exact: {Type: x}").unwrap();
        assert!(CompiledFilter::compile(&raw).is_err());
    }

    #[test]
    fn type_bindings_route_every_match() {
        use crate::config::Filter;
        let f = |yaml: &str| {
            let f: Filter = serde_saphyr::from_str(yaml).unwrap();
            CompiledFilter::compile(&f).unwrap().type_bindings()
        };
        assert_eq!(
            f("exact: {type: com.vmware.vsphere.VmPoweredOffEvent.v0}"),
            Some(vec!["com.vmware.vsphere.VmPoweredOffEvent.v0".to_string()])
        );
        assert_eq!(
            f("prefix: {type: com.vmware.}"),
            Some(vec!["com.vmware.#".to_string()])
        );
        assert_eq!(
            f("prefix: {type: com.vmware.vsphere.Vm}"),
            Some(vec!["com.vmware.vsphere.#".to_string()])
        );
        assert_eq!(f("prefix: {type: com}"), None);
        assert_eq!(f("exact: {subject: vm-1}"), None);
        assert_eq!(
            f("any: [{exact: {type: a.b}}, {prefix: {type: c.}}]"),
            Some(vec!["a.b".to_string(), "c.#".to_string()])
        );
        assert_eq!(
            f("any: [{exact: {type: a.b}}, {exact: {subject: x}}]"),
            None
        );
        assert_eq!(
            f("all: [{exact: {subject: x}}, {exact: {type: a.b}}]"),
            Some(vec!["a.b".to_string()])
        );
        assert_eq!(f("exact: {type: 'a.*'}"), None);
    }
}
