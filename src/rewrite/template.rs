//! The small template language of `connect.client_id` and `connect.username`.
//!
//! A template is text with placeholders in braces: `{name}` (the device entry's name), `{cn}` (the Common
//! Name of the device's certificate), `{client_id}` (the client id the device sent) and `{source}` (the
//! device's IP address, IPv4 as `192.168.10.21`, IPv6 as `fd00::21`). `{{` and `}}` stand for literal
//! braces. Anything else in braces is an error, found when the configuration is read.
//!
//! `{name}` and `{cn}` are fixed for a device, so a template made of them alone gives one value, known
//! when the configuration loads (and checked then); `{client_id}` and `{source}` are known only at connect
//! time. [`IdPattern`] describes every value such a template can take, so that a client id one device may
//! present can be kept from every other (`crate::device`).

use std::fmt;
use std::net::IpAddr;

/// The placeholders, as the documentation and error messages list them.
pub const PLACEHOLDERS: &str = "{name}, {cn}, {client_id}, {source}";

/// A parsed template; displays as it was written.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Name,
    Cn,
    ClientId,
    Source,
}

/// What a template is expanded with.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The device entry's name.
    pub name: &'a str,
    /// The Common Name of the device's certificate, if it has one.
    pub cn: Option<&'a str>,
    /// The device's address (IPv4-mapped IPv6 addresses are written as IPv4).
    pub source: IpAddr,
}

/// Why a template cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{something}` that is not a placeholder.
    #[error(
        "unknown placeholder {{{0}}}; the placeholders are {PLACEHOLDERS} (write {{{{ and }}}} for literal braces)"
    )]
    Unknown(String),
    /// A `{` without its `}`.
    #[error("a {{ that is not closed; write {{{{ for a literal {{")]
    Unclosed,
    /// A `}` that closes nothing.
    #[error("a }} that closes nothing; write }}}} for a literal }}")]
    StrayClose,
}

impl Template {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => return Err(TemplateError::StrayClose),
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(TemplateError::Unclosed),
                        }
                    }
                    let part = match name.as_str() {
                        "name" => Part::Name,
                        "cn" => Part::Cn,
                        "client_id" => Part::ClientId,
                        "source" => Part::Source,
                        _ => return Err(TemplateError::Unknown(name)),
                    };
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(part);
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template {
            text: text.to_string(),
            parts,
        })
    }

    /// The value for a device described by `ctx` that sent `client_id`. `{cn}` of a certificate without a
    /// Common Name is empty (loading refuses such a template for such a device).
    pub fn expand(&self, ctx: &Context<'_>, client_id: &str) -> String {
        let mut out = String::with_capacity(self.text.len() + client_id.len());
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Name => out.push_str(ctx.name),
                Part::Cn => out.push_str(ctx.cn.unwrap_or_default()),
                Part::ClientId => out.push_str(client_id),
                Part::Source => out.push_str(&ctx.source.to_canonical().to_string()),
            }
        }
        out
    }

    /// Whether the template is exactly `{client_id}`: the client id as sent, no rewrite at all.
    pub fn is_client_id(&self) -> bool {
        self.parts == [Part::ClientId]
    }

    /// Whether it uses `{cn}`.
    pub fn uses_cn(&self) -> bool {
        self.parts.contains(&Part::Cn)
    }

    /// The literal text between the placeholders.
    pub fn literals(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Text(t) => Some(t.as_str()),
            _ => None,
        })
    }

    /// Every value the template can take for the device named `name` whose certificate's CN is `cn`: one
    /// fixed value without `{client_id}` and `{source}`, else a pattern.
    pub fn values(&self, name: &str, cn: Option<&str>) -> Values {
        let mut tokens = Vec::new();
        let mut fixed = String::new();
        let mut dynamic = false;
        for part in &self.parts {
            let text = match part {
                Part::Text(t) => t.as_str(),
                Part::Name => name,
                Part::Cn => cn.unwrap_or_default(),
                Part::ClientId => {
                    dynamic = true;
                    tokens.push(Token::AnyRun);
                    continue;
                }
                Part::Source => {
                    dynamic = true;
                    tokens.extend([Token::AddressChar, Token::AddressRun]);
                    continue;
                }
            };
            fixed.push_str(text);
            tokens.extend(text.chars().map(Token::Char));
        }
        match dynamic {
            false => Values::Fixed(fixed),
            true => Values::Pattern(IdPattern::new(tokens)),
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Template({:?})", self.text)
    }
}

/// Every value a template can take for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Values {
    /// One value, known at load time.
    Fixed(String),
    /// Values that depend on the connection.
    Pattern(IdPattern),
}

/// The values a template with `{client_id}` or `{source}` can take for one device: `{client_id}` stands
/// for any run of characters, `{source}` for a non-empty run of the characters an IP address is written
/// with (`0-9`, `a-f`, `.`, `:`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdPattern {
    tokens: Vec<Token>,
    /// The fixed text at the start and the end of every value.
    prefix: String,
    suffix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Token {
    Char(char),
    /// Any run of characters, none included.
    AnyRun,
    /// One address character.
    AddressChar,
    /// Any run of address characters, none included.
    AddressRun,
}

fn is_address_char(c: char) -> bool {
    matches!(c, '0'..='9' | 'a'..='f' | '.' | ':')
}

impl IdPattern {
    fn new(tokens: Vec<Token>) -> IdPattern {
        let fixed = |t: &Token| match t {
            Token::Char(c) => Some(*c),
            _ => None,
        };
        let prefix = tokens.iter().map_while(fixed).collect();
        let mut suffix: Vec<char> = tokens.iter().rev().map_while(fixed).collect();
        suffix.reverse();
        IdPattern {
            tokens,
            prefix,
            suffix: suffix.into_iter().collect(),
        }
    }

    /// Whether the template can give `id`. Linear in `id` times the template's length, whatever `id` is
    /// (a device chooses the client id it sends).
    pub fn matches(&self, id: &str) -> bool {
        if !id.starts_with(self.prefix.as_str()) || !id.ends_with(self.suffix.as_str()) {
            return false;
        }
        let n = self.tokens.len();
        let mut states = vec![false; n + 1];
        let mut next = vec![false; n + 1];
        states[0] = true;
        self.close(&mut states);
        for c in id.chars() {
            next.iter_mut().for_each(|s| *s = false);
            for (i, token) in self.tokens.iter().enumerate() {
                if !states[i] {
                    continue;
                }
                match *token {
                    Token::Char(t) if t == c => next[i + 1] = true,
                    Token::AnyRun => next[i] = true,
                    Token::AddressChar if is_address_char(c) => next[i + 1] = true,
                    Token::AddressRun if is_address_char(c) => next[i] = true,
                    _ => {}
                }
            }
            self.close(&mut next);
            std::mem::swap(&mut states, &mut next);
            if !states.contains(&true) {
                return false;
            }
        }
        states[n]
    }

    /// Whether the values hold the device's address (`{source}`).
    pub fn has_source(&self) -> bool {
        self.tokens.contains(&Token::AddressChar)
    }

    /// Adds the states reachable without a character: past every run that may be empty.
    fn close(&self, states: &mut [bool]) {
        for (i, token) in self.tokens.iter().enumerate() {
            if states[i] && matches!(token, Token::AnyRun | Token::AddressRun) {
                states[i + 1] = true;
            }
        }
    }

    /// The fixed text every value starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether some value could come from both patterns. May say yes where none can (it compares the
    /// fixed text at both ends only); never says no where one can.
    pub fn may_overlap(&self, other: &IdPattern) -> bool {
        let (a, b) = (&self.prefix, &other.prefix);
        let (x, y) = (&self.suffix, &other.suffix);
        (a.starts_with(b.as_str()) || b.starts_with(a.as_str())) && (x.ends_with(y.as_str()) || y.ends_with(x.as_str()))
    }
}

/// The template with `{name}` and `{cn}` filled in: `esp-a-{source}`.
impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for token in &self.tokens {
            match token {
                Token::Char(c) => write!(f, "{c}")?,
                Token::AnyRun => f.write_str("{client_id}")?,
                Token::AddressChar => f.write_str("{source}")?,
                Token::AddressRun => {}
            }
        }
        Ok(())
    }
}

impl fmt::Debug for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdPattern({:?})", self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context<'static> {
        Context {
            name: "boiler-1",
            cn: Some("boiler-1.plant"),
            source: "192.168.10.21".parse().unwrap(),
        }
    }

    #[test]
    fn every_placeholder_expands() {
        let t = Template::parse("{name}/{cn}/{client_id}/{source}").unwrap();
        assert_eq!(
            t.expand(&ctx(), "ESP8266Client"),
            "boiler-1/boiler-1.plant/ESP8266Client/192.168.10.21"
        );
        assert_eq!(t.to_string(), "{name}/{cn}/{client_id}/{source}");
    }

    #[test]
    fn doubled_braces_are_literal() {
        let t = Template::parse("{{x}}-{name}}}").unwrap();
        assert_eq!(t.expand(&ctx(), ""), "{x}-boiler-1}");
        assert_eq!(t.values("n", None), Values::Fixed("{x}-n}".into()));
    }

    #[test]
    fn an_ipv4_mapped_source_is_written_as_ipv4_and_ipv6_as_ipv6() {
        let t = Template::parse("s-{source}").unwrap();
        let mut c = ctx();
        c.source = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(t.expand(&c, ""), "s-10.0.0.7");
        c.source = "fd00::21".parse().unwrap();
        assert_eq!(t.expand(&c, ""), "s-fd00::21");
    }

    #[test]
    fn mistakes_are_named() {
        assert_eq!(Template::parse("x-{nmae}"), Err(TemplateError::Unknown("nmae".into())));
        assert_eq!(Template::parse("x-{name"), Err(TemplateError::Unclosed));
        assert_eq!(Template::parse("x}"), Err(TemplateError::StrayClose));
        assert_eq!(Template::parse("{}"), Err(TemplateError::Unknown(String::new())));
        let text = TemplateError::Unknown("host".into()).to_string();
        assert!(
            text.starts_with("unknown placeholder {host}; the placeholders are {name}, {cn}, {client_id}, {source}"),
            "{text}"
        );
    }

    #[test]
    fn fixed_and_dynamic_values() {
        let fixed = Template::parse("dev-{name}-{cn}").unwrap();
        assert_eq!(fixed.values("a", Some("b")), Values::Fixed("dev-a-b".into()));
        assert!(Template::parse("{client_id}").unwrap().is_client_id());
        assert!(!Template::parse("x{client_id}").unwrap().is_client_id());
        let Values::Pattern(p) = Template::parse("esp-{source}").unwrap().values("a", None) else {
            panic!("dynamic")
        };
        assert!(p.matches("esp-192.168.10.31"));
        assert!(p.matches("esp-fd00::1"));
        assert!(!p.matches("esp-"), "an address is never empty");
        assert!(!p.matches("esp-boiler"));
        assert!(!p.matches("xesp-1.2.3.4"));
        let Values::Pattern(p) = Template::parse("{name}-{client_id}-x").unwrap().values("a", None) else {
            panic!("dynamic")
        };
        assert!(p.matches("a--x"));
        assert!(p.matches("a-anything at all-x"));
        assert!(!p.matches("a-x"));
        assert_eq!(p.to_string(), "a-{client_id}-x");
    }

    #[test]
    fn matching_a_long_id_is_linear() {
        let Values::Pattern(p) = Template::parse("{client_id}{client_id}{client_id}{source}z")
            .unwrap()
            .values("n", None)
        else {
            panic!("dynamic")
        };
        let id = "1".repeat(1 << 20);
        assert!(!p.matches(&id));
        assert!(p.matches(&format!("{id}z")));
    }

    #[test]
    fn overlap_is_judged_by_the_fixed_ends() {
        let pattern = |t: &str| match Template::parse(t).unwrap().values("n", None) {
            Values::Pattern(p) => p,
            Values::Fixed(_) => panic!("dynamic"),
        };
        assert!(pattern("esp-{source}").may_overlap(&pattern("esp-{client_id}")));
        assert!(pattern("esp-{source}").may_overlap(&pattern("{client_id}")));
        assert!(!pattern("esp-{source}").may_overlap(&pattern("pump-{source}")));
        assert!(!pattern("{source}-a").may_overlap(&pattern("{source}-b")));
        assert!(pattern("a{client_id}").may_overlap(&pattern("ab{source}")));
    }
}
