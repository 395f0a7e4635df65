//! The PostgreSQL database URL (`--database-url`), shown only with its
//! password redacted, and the placeholder translation from the `?` the
//! store's SQL is written with to PostgreSQL's `$1, $2, …`.

use std::fmt;

/// A `postgres://` URL. Its `Display`, `Debug` and `Serialize` never show
/// the password (in the user part or a `password=` parameter).
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Accepts `postgres://…` and `postgresql://…`. SQLite takes no URL:
    /// it is the file in the data directory, checked for private modes.
    pub fn parse(url: &str) -> Result<Self, String> {
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("postgres" | "postgresql") => Ok(Self(url.to_owned())),
            Some("sqlite") => Err(
                "SQLite is the default: leave out --database-url (the database is leash.db in --data-dir)"
                    .into(),
            ),
            _ => Err("expected a postgres:// URL".into()),
        }
    }

    /// The URL itself, password included: for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with the password replaced by `***`.
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let Some((scheme, rest)) = url.split_once("://") else {
            return "***".into();
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:***@{host}"),
                None => format!("{userinfo}@{host}"),
            },
            None => authority.to_owned(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let query: Vec<String> = query
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                        _ => pair.to_owned(),
                    })
                    .collect();
                format!("{path}?{}", query.join("&"))
            }
            None => tail.to_owned(),
        };
        format!("{scheme}://{authority}{tail}")
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted())
    }
}

impl serde::Serialize for DatabaseUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

/// `sql` with each `?` placeholder numbered for PostgreSQL (`$1`, `$2`, …
/// in order). A `?` inside a string literal (`'…'`), a quoted identifier
/// (`"…"`) or a comment is text, not a placeholder.
pub fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0u32;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '?' => {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            }
            '\'' | '"' => {
                // Copied as is up to the closing quote; a doubled quote is
                // an escaped one and keeps the literal open.
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == c {
                        break;
                    }
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_in_order() {
        assert_eq!(
            numbered_placeholders("INSERT INTO t (a, b, c) VALUES (?, ?, ?)"),
            "INSERT INTO t (a, b, c) VALUES ($1, $2, $3)"
        );
        assert_eq!(numbered_placeholders("SELECT 1"), "SELECT 1");
        let many = ["?"; 12].join(",");
        assert!(numbered_placeholders(&many).ends_with("$11,$12"));
    }

    #[test]
    fn a_question_mark_in_a_literal_identifier_or_comment_is_text() {
        assert_eq!(
            numbered_placeholders(
                "SELECT '?', 'it''s ?', \"a?b\" FROM t WHERE x = ? -- why?\nAND y = ?"
            ),
            "SELECT '?', 'it''s ?', \"a?b\" FROM t WHERE x = $1 -- why?\nAND y = $2"
        );
    }

    #[test]
    fn the_password_never_shows() {
        let url = DatabaseUrl::parse(
            "postgres://leash:s3cr%40t@db.internal:5432/leash?sslmode=require&password=other",
        )
        .unwrap();
        for shown in [
            url.to_string(),
            format!("{url:?}"),
            serde_json::to_string(&url).unwrap(),
        ] {
            assert!(!shown.contains("s3cr"), "{shown}");
            assert!(!shown.contains("other"), "{shown}");
            assert!(
                shown.contains("leash:***@db.internal:5432/leash"),
                "{shown}"
            );
            assert!(shown.contains("sslmode=require&password=***"), "{shown}");
        }
        assert!(url.expose().contains("s3cr%40t"));
        // No password: nothing to hide, nothing changed.
        let plain = DatabaseUrl::parse("postgresql://db/leash").unwrap();
        assert_eq!(plain.to_string(), "postgresql://db/leash");
        // An '@' in the password (unescaped) does not leak its first part.
        let at = DatabaseUrl::parse("postgres://u:p@ss@h/d").unwrap();
        assert_eq!(at.to_string(), "postgres://u:***@h/d");
    }

    #[test]
    fn only_postgres_urls_are_taken() {
        assert!(
            DatabaseUrl::parse("sqlite://x.db")
                .unwrap_err()
                .contains("--data-dir")
        );
        assert!(DatabaseUrl::parse("mysql://h/d").is_err());
        assert!(DatabaseUrl::parse("db.internal").is_err());
    }
}
