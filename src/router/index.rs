//! Candidate triggers for an event without checking every trigger: each trigger is filed
//! under one requirement of its top-level filters (an attribute's exact value, prefix or
//! suffix), and an event looks up its own attribute values: the exact value, and its
//! leading and trailing substrings of the lengths filed. Thousands of prefix triggers cost
//! a few hash lookups. A candidate's filters are still evaluated whole.

use super::filter::CompiledFilter;
use cloudevents::{AttributesReader, Event};
use std::collections::HashMap;

/// The triggers filed by requirement, and those with none to file by.
#[derive(Default)]
pub(super) struct Index {
    by_attribute: Vec<(String, Filed)>,
    unindexed: Vec<usize>,
}

/// One attribute's triggers.
#[derive(Default)]
struct Filed {
    exact: HashMap<String, Vec<usize>>,
    prefix: Affixes,
    suffix: Affixes,
}

/// Triggers by prefix (or suffix), and the distinct lengths of those, ascending.
#[derive(Default)]
struct Affixes {
    by_value: HashMap<String, Vec<usize>>,
    lengths: Vec<usize>,
}

impl Affixes {
    fn add(&mut self, value: &str, trigger: usize) {
        self.by_value
            .entry(value.to_string())
            .or_default()
            .push(trigger);
        if let Err(at) = self.lengths.binary_search(&value.len()) {
            self.lengths.insert(at, value.len());
        }
    }

    /// The triggers filed under a leading (`suffix` false) or trailing part of `value`.
    fn lookup(&self, value: &str, suffix: bool, out: &mut Vec<usize>) -> bool {
        let mut found = false;
        for &len in self.lengths.iter().take_while(|l| **l <= value.len()) {
            let part = if suffix {
                value.get(value.len() - len..)
            } else {
                value.get(..len)
            };
            if let Some(hits) = part.and_then(|p| self.by_value.get(p)) {
                out.extend_from_slice(hits);
                found = true;
            }
        }
        found
    }
}

/// How a trigger is filed: the most selective requirement its filters state.
enum Requirement<'a> {
    Exact(&'a str, &'a str),
    Prefix(&'a str, &'a str),
    Suffix(&'a str, &'a str),
}

/// An exact, prefix or suffix filter's (attribute, value) pairs.
type Pairs = Vec<(String, String)>;

fn requirement<'a>(filters: &'a [CompiledFilter]) -> Option<Requirement<'a>> {
    let pairs = |want: fn(&CompiledFilter) -> Option<&Pairs>| {
        filters
            .iter()
            .filter_map(want)
            .flatten()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<Vec<_>>()
    };
    let exact = pairs(|f| match f {
        CompiledFilter::Exact(p) => Some(p),
        _ => None,
    });
    // An exact type first: most triggers say which type they take.
    if let Some((k, v)) = exact.iter().find(|(k, _)| *k == "type").or(exact.first()) {
        return Some(Requirement::Exact(k, v));
    }
    let longest = |p: Vec<(&'a str, &'a str)>| p.into_iter().max_by_key(|(_, v)| v.len());
    if let Some((k, v)) = longest(pairs(|f| match f {
        CompiledFilter::Prefix(p) => Some(p),
        _ => None,
    })) {
        return Some(Requirement::Prefix(k, v));
    }
    longest(pairs(|f| match f {
        CompiledFilter::Suffix(p) => Some(p),
        _ => None,
    }))
    .map(|(k, v)| Requirement::Suffix(k, v))
}

impl Index {
    /// Files each trigger (by its position) under its filters' requirement.
    pub(super) fn build<'a>(filters: impl Iterator<Item = &'a [CompiledFilter]>) -> Index {
        let mut index = Index::default();
        for (i, f) in filters.enumerate() {
            let Some(req) = requirement(f) else {
                index.unindexed.push(i);
                continue;
            };
            let (Requirement::Exact(attr, _)
            | Requirement::Prefix(attr, _)
            | Requirement::Suffix(attr, _)) = req;
            let filed = match index.by_attribute.iter().position(|(a, _)| a == attr) {
                Some(at) => &mut index.by_attribute[at].1,
                None => {
                    index
                        .by_attribute
                        .push((attr.to_string(), Filed::default()));
                    &mut index.by_attribute.last_mut().expect("just pushed").1
                }
            };
            match req {
                Requirement::Exact(_, v) => filed.exact.entry(v.to_string()).or_default().push(i),
                Requirement::Prefix(_, v) => filed.prefix.add(v, i),
                Requirement::Suffix(_, v) => filed.suffix.add(v, i),
            }
        }
        index
    }

    /// The triggers that may match `event`, in configuration order.
    pub(super) fn candidates(&self, event: &Event) -> Vec<usize> {
        let mut out = self.unindexed.clone();
        let mut sources = usize::from(!out.is_empty());
        for (attr, filed) in &self.by_attribute {
            let owned;
            let value = match attr.as_str() {
                "type" => event.ty(),
                _ => match crate::event::attribute(event, attr) {
                    Some(v) => {
                        owned = v;
                        owned.as_str()
                    }
                    None => continue,
                },
            };
            if let Some(hits) = filed.exact.get(value) {
                out.extend_from_slice(hits);
                sources += 1;
            }
            sources += usize::from(filed.prefix.lookup(value, false, &mut out));
            sources += usize::from(filed.suffix.lookup(value, true, &mut out));
        }
        if sources > 1 {
            out.sort_unstable();
        }
        out
    }
}
