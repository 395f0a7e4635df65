//! `aws-sigv4` without a stored key: temporary credentials from STS
//! `AssumeRoleWithWebIdentity`, obtained with a JWT the control plane
//! issues for the workload (its SPIFFE ID as `sub`), so that the role's
//! trust policy can name workloads. One set per (upstream, workload),
//! cached and leased until shortly before it expires (10 % of its life, at
//! least 5 s); a set whose lease id was revoked is never leased again.
//!
//! The request is STS's documented query API (form POST, `Version
//! 2011-06-15`); the answer is its XML, of which only the four credential
//! fields and an error's code are read. Errors never quote the answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use zeroize::Zeroizing;

use crate::https::HttpsClient;
use crate::oauth2::TokenError;

/// AWS's endpoint when policy names none.
pub const DEFAULT_STS_URL: &str = "https://sts.amazonaws.com/";
/// STS's bounds on `DurationSeconds`.
const MIN_DURATION: u64 = 900;
const MAX_DURATION: u64 = 43_200;

/// Temporary credentials, rendered as the sidecar takes a brokered key.
#[derive(Clone)]
pub struct TempCredentials {
    pub id: String,
    /// `ACCESS_KEY_ID:SECRET_ACCESS_KEY:SESSION_TOKEN`.
    pub secret: Arc<Zeroizing<String>>,
    pub use_until: Instant,
    pub use_until_unix_ms: i64,
}

/// What one `AssumeRoleWithWebIdentity` call needs besides the token.
pub struct Assume<'a> {
    pub upstream: &'a str,
    pub workload: &'a str,
    pub sts_url: &'a str,
    pub role_arn: &'a str,
    pub duration: Duration,
}

/// One (upstream, workload)'s set; held across an exchange so that
/// concurrent leases wait for its result.
type Slot = Arc<tokio::sync::Mutex<Option<TempCredentials>>>;

#[derive(Default)]
pub struct StsCache {
    sets: Mutex<HashMap<(String, String), Slot>>,
    client: std::sync::OnceLock<HttpsClient>,
}

impl StsCache {
    fn client(&self) -> &HttpsClient {
        self.client
            .get_or_init(|| crate::https::client(crate::https::system_trust(), None))
    }

    /// The cached set for this workload and upstream while it is usable and
    /// not `revoked`, else `token()`'s JWT exchanged for a new one.
    /// `mint` makes the lease id and the JWT presented to STS.
    pub async fn get(
        &self,
        a: &Assume<'_>,
        revoked: impl Fn(&str) -> bool,
        mint: impl FnOnce() -> Result<(String, Zeroizing<String>), TokenError>,
    ) -> Result<TempCredentials, TokenError> {
        let (upstream, workload) = (a.upstream, a.workload);
        let slot = {
            let mut sets = self
                .sets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            sets.entry((upstream.to_owned(), workload.to_owned()))
                .or_default()
                .clone()
        };
        let mut cached = slot.lock().await;
        if let Some(c) = cached
            .as_ref()
            .filter(|c| Instant::now() < c.use_until && !revoked(&c.id))
        {
            return Ok(c.clone());
        }
        *cached = None;
        let (id, token) = mint()?;
        let fresh = self.assume(id, a, &token).await?;
        *cached = Some(fresh.clone());
        Ok(fresh)
    }

    async fn assume(
        &self,
        id: String,
        a: &Assume<'_>,
        web_identity_token: &str,
    ) -> Result<TempCredentials, TokenError> {
        let duration = a.duration.as_secs().clamp(MIN_DURATION, MAX_DURATION);
        // Session names are [\w+=,.@-]{2,64}: the workload's ID, sanitised.
        let session: String = a
            .workload
            .trim_start_matches("spiffe://")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "+=,.@-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .take(64)
            .collect();
        let form = Zeroizing::new(format!(
            "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn={}&RoleSessionName={}&DurationSeconds={duration}&WebIdentityToken={}",
            encode(a.role_arn),
            encode(&session),
            encode(web_identity_token),
        ));
        let req = http::Request::post(a.sts_url)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(Full::new(Bytes::from(form.as_bytes().to_vec())))
            .map_err(|e| TokenError::Unreachable(e.to_string()))?;
        let started = Instant::now();
        let (status, body) = crate::oauth2::call(self.client(), req).await?;
        let body = Zeroizing::new(String::from_utf8_lossy(&body).into_owned());
        if status != 200 {
            let detail = element(&body, "Code")
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            return Err(TokenError::Refused { status, detail });
        }
        let field = |name: &str| {
            element(&body, name)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic()))
                .ok_or_else(|| TokenError::Invalid(format!("no {name} in the STS answer")))
        };
        let secret = Zeroizing::new(format!(
            "{}:{}:{}",
            field("AccessKeyId")?,
            field("SecretAccessKey")?,
            field("SessionToken")?
        ));
        let expiration = field("Expiration")?;
        let expires =
            time::OffsetDateTime::parse(expiration, &time::format_description::well_known::Rfc3339)
                .map_err(|_| TokenError::Invalid("Expiration is not an RFC 3339 time".into()))?;
        let now = time::OffsetDateTime::now_utc();
        let lifetime = Duration::try_from(expires - now)
            .map_err(|_| TokenError::Invalid("the credentials arrived expired".into()))?;
        let margin = (lifetime / 10)
            .max(Duration::from_secs(5))
            .min(lifetime / 2);
        let use_for = lifetime.saturating_sub(margin);
        let use_until_unix_ms = crate::store::now_ms().saturating_add(
            i64::try_from(use_for.saturating_sub(started.elapsed()).as_millis()).unwrap_or(0),
        );
        tracing::info!(upstream = %a.upstream, workload = %a.workload, credential_id = %id, "temporary AWS credentials obtained");
        Ok(TempCredentials {
            id,
            secret: Arc::new(secret),
            use_until: started + use_for,
            use_until_unix_ms,
        })
    }
}

/// The text of the first `<name>` element (STS answers are flat enough;
/// no entity in the fields read).
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))?;
    Some(xml[start..start + end].trim())
}

const FORM: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, FORM).to_string()
}

#[cfg(test)]
mod tests {
    use super::element;

    #[test]
    fn the_fields_of_an_sts_answer_are_read() {
        // The shape of AWS's documented AssumeRoleWithWebIdentity response.
        let xml = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>spiffe://td/ns/a</SubjectFromWebIdentityToken>
    <Credentials>
      <SessionToken>AQoDYXdzEE0a8ANXXXXXXXXNO1ewxE5TijQyp+IEXAMPLE</SessionToken>
      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
      <Expiration>2014-10-24T23:00:23Z</Expiration>
      <AccessKeyId>ASgeIAIOSFODNN7EXAMPLE</AccessKeyId>
    </Credentials>
  </AssumeRoleWithWebIdentityResult>
</AssumeRoleWithWebIdentityResponse>"#;
        assert_eq!(element(xml, "AccessKeyId"), Some("ASgeIAIOSFODNN7EXAMPLE"));
        assert_eq!(element(xml, "Expiration"), Some("2014-10-24T23:00:23Z"));
        assert_eq!(element(xml, "Code"), None);
        let err = "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code></Error></ErrorResponse>";
        assert_eq!(element(err, "Code"), Some("InvalidIdentityToken"));
    }
}
