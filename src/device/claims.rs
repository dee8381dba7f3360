//! Which client ids belong to which entries once some entries rewrite theirs: the rule "a client id
//! belongs to its device" extended from the client ids devices send to the client ids the broker sees.
//!
//! An entry claims the client id its `client_id` rule names, the one fixed client id it presents after a
//! rewrite (`connect.client_id = "boiler-{name}"`), or every client id its template could give
//! (`connect.client_id = "esp-{source}"`). A connection may present a client id only if no entry claims it
//! or its own entry does; exact claims (a rule, a fixed id) come before template claims, so a template never
//! yields a client id that an entry names or presents as such. Loading refuses two entries with the same
//! fixed client id, so what is left for the check here is a device that sends, or a template that gives,
//! another entry's client id.
//!
//! Without any client id rewrite in the configuration there are no claims to check: [`super::Routes::find`]
//! already serves a client id that a rule names only to its devices, and every other connection presents
//! the client id it sent.

use std::collections::HashMap;
use std::sync::Arc;

use super::Device;
use crate::rewrite::{IdPattern, Values};

/// The client ids entries claim at the broker.
#[derive(Debug)]
pub(crate) struct Claims {
    /// Client id -> the entries that name it in a rule or present it as their fixed rewritten client id.
    exact: HashMap<String, Vec<Arc<str>>>,
    /// The entries that present client ids from a template, with every value it can take, by the fixed
    /// text those values start with: a client id is matched only against the templates whose fixed start
    /// it has, however many entries have templates.
    patterns: HashMap<String, Vec<(Arc<str>, IdPattern)>>,
    /// The lengths of those starts, in bytes.
    prefix_lens: Vec<usize>,
}

impl Claims {
    /// The claims of `entries`; `None` when none of them rewrites its client id.
    pub(crate) fn of<'a, I: 'a>(entries: impl Iterator<Item = &'a Arc<Device<I>>> + Clone) -> Option<Claims> {
        if !entries.clone().any(|d| d.presents.is_some()) {
            return None;
        }
        let mut exact: HashMap<String, Vec<Arc<str>>> = HashMap::new();
        let mut patterns: HashMap<String, Vec<(Arc<str>, IdPattern)>> = HashMap::new();
        for d in entries {
            let mut claim = |id: &str| {
                let owners = exact.entry(id.to_string()).or_default();
                if !owners.contains(&d.name) {
                    owners.push(d.name.clone());
                }
            };
            if let Some(id) = &d.rules.client_id {
                claim(id);
            }
            match &d.presents {
                Some(Values::Fixed(id)) => claim(id),
                Some(Values::Pattern(p)) => patterns
                    .entry(p.prefix().to_string())
                    .or_default()
                    .push((d.name.clone(), p.clone())),
                None => {}
            }
        }
        let mut prefix_lens: Vec<usize> = patterns.keys().map(String::len).collect();
        prefix_lens.sort_unstable();
        prefix_lens.dedup();
        Some(Claims {
            exact,
            patterns,
            prefix_lens,
        })
    }

    /// The entry that `id` belongs to, when it is not the entry named `name`: `None` when `name` may present
    /// `id` to the broker.
    pub(crate) fn owner_other_than(&self, name: &str, id: &str) -> Option<&Arc<str>> {
        if let Some(owners) = self.exact.get(id) {
            return match owners.iter().any(|o| &**o == name) {
                true => None,
                false => owners.first(),
            };
        }
        let starts = self
            .prefix_lens
            .iter()
            .take_while(|&&n| n <= id.len())
            .filter_map(|&n| self.patterns.get(id.get(..n)?))
            .flatten();
        let mut claimants = starts.filter(|(_, p)| p.matches(id)).map(|(n, _)| n);
        let first = claimants.next()?;
        match &**first == name || claimants.any(|n| &**n == name) {
            true => None,
            false => Some(first),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::Template;
    use crate::rules::Rules;

    fn entry(name: &str, rule: Option<&str>, template: Option<&str>) -> Arc<Device<()>> {
        Arc::new(Device {
            name: name.into(),
            rules: Rules {
                client_id: rule.map(str::to_string),
                client_id_patterns: Vec::new(),
                sources: Vec::new(),
                listeners: Vec::new(),
            },
            identity: (),
            rewrite: None,
            presents: template.map(|t| Template::parse(t).unwrap().values(name, None)),
        })
    }

    #[test]
    fn no_rewrite_no_claims() {
        let entries = [entry("a", Some("a"), None), entry("b", None, None)];
        assert!(Claims::of(entries.iter()).is_none());
    }

    #[test]
    fn a_client_id_is_presented_only_by_the_entry_it_belongs_to() {
        let entries = [
            entry("esp-a", Some("ESP8266Client"), Some("{name}")),
            entry("esp-b", Some("ESP8266Client"), Some("{name}")),
            entry("boiler-1", Some("boiler-1"), None),
            entry("batch", None, Some("esp-{source}")),
            entry("open", None, None),
        ];
        let claims = Claims::of(entries.iter()).unwrap();
        let owner = |name: &str, id: &str| claims.owner_other_than(name, id).map(|o| o.to_string());
        assert_eq!(owner("esp-a", "esp-a"), None);
        assert_eq!(owner("esp-b", "esp-a"), Some("esp-a".into()));
        assert_eq!(
            owner("open", "esp-b"),
            Some("esp-b".into()),
            "a device sending another's id"
        );
        assert_eq!(owner("open", "boiler-1"), Some("boiler-1".into()));
        assert_eq!(owner("batch", "esp-10.0.0.1"), None);
        assert_eq!(
            owner("open", "esp-10.0.0.1"),
            Some("batch".into()),
            "a template's values belong to it"
        );
        assert_eq!(
            owner("open", "esp-boiler"),
            None,
            "not an address: no template gives it"
        );
        assert_eq!(owner("open", "anything-else"), None);
        // Both devices that name the shared client id may present it (told apart by their other rules).
        assert_eq!(owner("esp-b", "ESP8266Client"), None);
        assert_eq!(owner("batch", "ESP8266Client"), Some("esp-a".into()));
    }

    #[test]
    fn an_exact_claim_comes_before_a_template() {
        let entries = [
            entry("boiler-1", Some("boiler-1"), None),
            entry("any", None, Some("{client_id}-x")),
            entry("fixed", None, Some("boiler-2-x")),
        ];
        let claims = Claims::of(entries.iter()).unwrap();
        assert_eq!(
            claims.owner_other_than("any", "boiler-2-x").map(|o| &**o),
            Some("fixed")
        );
        assert_eq!(claims.owner_other_than("any", "boiler-3-x"), None);
    }
}
