//! Findings from the secret scanners teams already run, read from their own
//! JSON reports: gitleaks (`gitleaks detect --report-format json`),
//! trufflehog3 (`trufflehog3 --format json`) and detect-secrets (`detect-secrets
//! scan`, a baseline). Each finding's secret is grouped with every other
//! place the same value was found, so one leaked value is registered once.
//!
//! A report is full of secrets: nothing here ever puts a value into an
//! error or a log line. Errors say where (line, column, field), never what.
//! detect-secrets keeps only a SHA-1 of each secret; the value is recovered
//! from the scanned file itself (the line it names, under `root`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zeroize::Zeroizing;

/// The report formats understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Gitleaks,
    Trufflehog,
    DetectSecrets,
}

/// Where a scanner saw a secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Location {
    pub file: String,
    pub line: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The scanner's rule (`aws-access-token`, `Secret Keyword`, ...).
    pub rule: String,
}

/// One secret value and every place it was found.
pub struct Secret {
    pub value: Zeroizing<String>,
    pub locations: Vec<Location>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("value", &"<redacted>")
            .field("locations", &self.locations)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("the report is not {format} JSON: {what} at line {line}, column {column}{at}")]
    Parse {
        format: &'static str,
        what: String,
        line: usize,
        column: usize,
        /// The field, as a path into the report (`[2].StartLine`).
        at: String,
    },
    #[error("finding {index} (line {line} of {file}): {reason}")]
    Finding {
        index: usize,
        file: String,
        line: u64,
        reason: String,
    },
    #[error("cannot read {path} to recover a detect-secrets finding: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reads `report` as `format`; `root` is the directory the scan ran in
/// (detect-secrets' file names are relative to it). Nothing is returned
/// unless every finding was understood.
pub fn read(format: Format, report: &[u8], root: &Path) -> Result<Vec<Secret>, ReportError> {
    let findings = match format {
        Format::Gitleaks => gitleaks(report)?,
        Format::Trufflehog => trufflehog(report)?,
        Format::DetectSecrets => detect_secrets(report, root)?,
    };
    let mut secrets: Vec<Secret> = Vec::new();
    for (value, location) in findings {
        match secrets.iter_mut().find(|s| *s.value == *value) {
            Some(s) if s.locations.contains(&location) => {}
            Some(s) => s.locations.push(location),
            None => secrets.push(Secret {
                value,
                locations: vec![location],
            }),
        }
    }
    Ok(secrets)
}

/// Deserializes without ever quoting the report (serde's messages can
/// include a value): the kind of error, where, and the field's path.
fn parse<'de, T: Deserialize<'de>>(
    format: &'static str,
    report: &'de [u8],
) -> Result<T, ReportError> {
    let mut de = serde_json::Deserializer::from_slice(report);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let at = e.path().to_string();
        let inner = e.into_inner();
        let what = match inner.classify() {
            serde_json::error::Category::Io => "a read error",
            serde_json::error::Category::Syntax => "a syntax error",
            serde_json::error::Category::Eof => "an unexpected end",
            serde_json::error::Category::Data => "a field of the wrong type or missing",
        };
        ReportError::Parse {
            format,
            what: what.to_owned(),
            line: inner.line(),
            column: inner.column(),
            at: if at.is_empty() || at == "." {
                String::new()
            } else {
                format!(" (field {at})")
            },
        }
    })
}

type Found = (Zeroizing<String>, Location);

fn finding(
    index: usize,
    location: &Location,
    value: Zeroizing<String>,
) -> Result<Found, ReportError> {
    if value.trim().is_empty() {
        return Err(ReportError::Finding {
            index,
            file: location.file.clone(),
            line: location.line,
            reason: "the finding has no secret".into(),
        });
    }
    Ok((value, location.clone()))
}

/// gitleaks' JSON report: an array of findings with the secret in `Secret`.
fn gitleaks(report: &[u8]) -> Result<Vec<Found>, ReportError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Leak {
        #[serde(rename = "RuleID")]
        rule_id: String,
        file: String,
        start_line: u64,
        secret: Zeroizing<String>,
        #[serde(default)]
        commit: String,
    }
    let leaks: Vec<Leak> = parse("gitleaks", report)?;
    leaks
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let location = Location {
                file: l.file,
                line: l.start_line,
                commit: Some(l.commit).filter(|c| !c.is_empty()),
                rule: l.rule_id,
            };
            finding(i, &location, l.secret)
        })
        .collect()
}

/// trufflehog3's JSON report: an array of issues, each with its rule, path,
/// line (a string) and the secret.
fn trufflehog(report: &[u8]) -> Result<Vec<Found>, ReportError> {
    #[derive(Deserialize)]
    struct Rule {
        id: String,
    }
    #[derive(Deserialize)]
    struct Issue {
        rule: Rule,
        path: String,
        line: serde_json::Value,
        secret: Zeroizing<String>,
        #[serde(default)]
        commit: Option<String>,
    }
    let issues: Vec<Issue> = parse("trufflehog", report)?;
    issues
        .into_iter()
        .enumerate()
        .map(|(i, issue)| {
            let line = match &issue.line {
                serde_json::Value::Number(n) => n.as_u64(),
                serde_json::Value::String(s) => s.parse().ok(),
                _ => None,
            };
            let location = Location {
                file: issue.path,
                line: line.unwrap_or(0),
                commit: issue.commit,
                rule: issue.rule.id,
            };
            if line.is_none() {
                return Err(ReportError::Finding {
                    index: i,
                    file: location.file,
                    line: 0,
                    reason: "its line is not a number".into(),
                });
            }
            finding(i, &location, issue.secret)
        })
        .collect()
}

/// Longest secret looked for when recovering a detect-secrets finding, and
/// longest line searched.
const MAX_SECRET: usize = 512;
const MAX_LINE: usize = 16 * 1024;

/// detect-secrets' baseline: results by file, each with a SHA-1 of the
/// secret and its line. The value is found again in the file.
fn detect_secrets(report: &[u8], root: &Path) -> Result<Vec<Found>, ReportError> {
    #[derive(Deserialize)]
    struct Baseline {
        results: BTreeMap<String, Vec<Result_>>,
    }
    #[derive(Deserialize)]
    struct Result_ {
        #[serde(rename = "type")]
        kind: String,
        filename: String,
        hashed_secret: String,
        line_number: u64,
    }
    let baseline: Baseline = parse("detect-secrets", report)?;
    let mut out = Vec::new();
    let mut files: BTreeMap<String, Zeroizing<String>> = BTreeMap::new();
    for (index, r) in baseline.results.into_values().flatten().enumerate() {
        let location = Location {
            file: r.filename.clone(),
            line: r.line_number,
            commit: None,
            rule: r.kind,
        };
        let fail = |reason: &str| ReportError::Finding {
            index,
            file: location.file.clone(),
            line: location.line,
            reason: reason.into(),
        };
        let Some(hash) = hex::decode(&r.hashed_secret).ok().filter(|h| h.len() == 20) else {
            return Err(fail("hashed_secret is not a SHA-1 in hex"));
        };
        if !files.contains_key(&r.filename) {
            let path = root.join(&r.filename);
            let text = std::fs::read_to_string(&path)
                .map_err(|source| ReportError::Read { path, source })?;
            files.insert(r.filename.clone(), Zeroizing::new(text));
        }
        let text = files
            .get(&r.filename)
            .map(|t| t.as_str())
            .unwrap_or_default();
        let line = usize::try_from(r.line_number)
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|n| text.lines().nth(n))
            .ok_or_else(|| fail("the file has no such line (was it changed since the scan?)"))?;
        if line.len() > MAX_LINE {
            return Err(fail("the line is too long to search for the secret"));
        }
        let value = with_sha1(line, &hash).ok_or_else(|| {
            fail("no part of the line has the secret's hash (was it changed since the scan?)")
        })?;
        out.push((Zeroizing::new(value.to_owned()), location));
    }
    Ok(out)
}

/// The substring of `line` (on character boundaries, at most `MAX_SECRET`
/// bytes) whose SHA-1 is `hash`: the longest, when several are.
fn with_sha1<'a>(line: &'a str, hash: &[u8]) -> Option<&'a str> {
    use ring::digest::{Context, SHA1_FOR_LEGACY_USE_ONLY};
    let mut found: Option<&str> = None;
    for (start, _) in line.char_indices() {
        let mut ctx = Context::new(&SHA1_FOR_LEGACY_USE_ONLY);
        let rest = &line[start..];
        for (offset, c) in rest.char_indices() {
            let end = offset + c.len_utf8();
            if end > MAX_SECRET {
                break;
            }
            let mut buf = [0u8; 4];
            ctx.update(c.encode_utf8(&mut buf).as_bytes());
            if ctx.clone().finish().as_ref() == hash && found.is_none_or(|f| f.len() < end) {
                found = Some(&rest[..end]);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitleaks_findings_are_grouped_by_secret() {
        let report = br#"[
          {"Description":"AWS","StartLine":2,"EndLine":2,"StartColumn":1,"EndColumn":20,
           "Match":"AKIA...","Secret":"AKIAIOSFODNN7EXAMPLQ","File":"app.py","SymlinkFile":"",
           "Commit":"abc123","Entropy":3.5,"Author":"a","Email":"a@b","Date":"2026-01-01T00:00:00Z",
           "Message":"m","Tags":[],"RuleID":"aws-access-token","Fingerprint":"abc123:app.py:aws-access-token:2"},
          {"Description":"AWS","StartLine":7,"Secret":"AKIAIOSFODNN7EXAMPLQ","File":"ci.yml",
           "Commit":"","RuleID":"aws-access-token"}
        ]"#;
        let secrets = read(Format::Gitleaks, report, Path::new(".")).unwrap();
        assert_eq!(secrets.len(), 1);
        assert_eq!(secrets[0].value.as_str(), "AKIAIOSFODNN7EXAMPLQ");
        assert_eq!(secrets[0].locations.len(), 2);
        assert_eq!(secrets[0].locations[0].commit.as_deref(), Some("abc123"));
        assert_eq!(secrets[0].locations[1].commit, None);
    }

    #[test]
    fn malformed_reports_name_the_line_and_never_quote_a_value() {
        let report = b"[\n {\"RuleID\":\"r\",\"File\":\"f\",\"StartLine\":\"s3cr3t-in-the-wrong-place\",\n  \"Secret\":\"s3cr3t\"}\n]";
        let e = read(Format::Gitleaks, report, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("StartLine"), "{e}");
        assert!(!e.contains("s3cr3t"), "{e}");
        let e = read(Format::Trufflehog, b"[{\"rule\":", Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = read(
            Format::Gitleaks,
            br#"[{"RuleID":"r","File":"f","StartLine":1,"Secret":" "}]"#,
            Path::new("."),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no secret"), "{e}");
    }

    #[test]
    fn a_detect_secrets_value_is_found_again_by_its_hash() {
        let line = r#"password = "s3cr3t-Zx9-hunter2-long""#;
        let hash = ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            b"s3cr3t-Zx9-hunter2-long",
        );
        assert_eq!(
            with_sha1(line, hash.as_ref()),
            Some("s3cr3t-Zx9-hunter2-long")
        );
        assert_eq!(with_sha1("nothing here", hash.as_ref()), None);
    }
}
