//! JWT authentication and org grants (PROTOCOL.md section 5).
//!
//! Owns key loading, token verification and the [`Grant`] a verified token gives. Never logs a
//! token and never sees a socket: transports and the HTTP API pass the token string in.

use std::collections::HashSet;
use std::fmt;

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::model::OrgId;

/// The shortest HS256 secret the server accepts.
pub const MIN_SECRET_BYTES: usize = 16;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Which signature algorithm tokens must use. Written with its JOSE name (`HS256`, `RS256`,
/// `ES256`, `EdDSA`), in any case, on the command line, in the environment and in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum JwtAlg {
    HS256,
    RS256,
    ES256,
    EdDSA,
}

impl std::str::FromStr for JwtAlg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [JwtAlg::HS256, JwtAlg::RS256, JwtAlg::ES256, JwtAlg::EdDSA]
            .into_iter()
            .find(|a| format!("{a:?}").eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown JWT algorithm {s:?}: HS256, RS256, ES256 or EdDSA"))
    }
}

impl<'de> Deserialize<'de> for JwtAlg {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl JwtAlg {
    fn algorithm(self) -> Algorithm {
        match self {
            JwtAlg::HS256 => Algorithm::HS256,
            JwtAlg::RS256 => Algorithm::RS256,
            JwtAlg::ES256 => Algorithm::ES256,
            JwtAlg::EdDSA => Algorithm::EdDSA,
        }
    }
}

/// Why a token was refused. Every variant maps to close code 4001 / HTTP 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing access token")]
    Missing,
    #[error("token larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm is not the configured one")]
    WrongAlgorithm,
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("wrong token issuer")]
    WrongIssuer,
    #[error("wrong token audience")]
    WrongAudience,
    #[error("token lacks required claim {0}")]
    MissingClaim(String),
    #[error("refreshed token names another subject")]
    SubjectChanged,
    #[error("unknown token key id (kid)")]
    UnknownKeyId,
    #[error("token lifetime over the maximum (--jwt-max-lifetime)")]
    LifetimeTooLong,
    #[error("two different access tokens in one request")]
    Conflicting,
}

/// The token of a request: its `Authorization: Bearer` header and every `access_token`
/// parameter of its query (browsers cannot set headers on WebSocket and WebTransport) must
/// agree; none at all is an empty token ([`AuthError::Missing`] at verification). One rule for
/// HTTP, WebSocket and WebTransport.
pub fn request_token(bearer: Option<&str>, query: &str) -> Result<String, AuthError> {
    let params: Vec<std::borrow::Cow<'_, str>> = form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "access_token")
        .map(|(_, v)| v)
        .collect();
    Ok(
        one_token(bearer.into_iter().chain(params.iter().map(|v| v.as_ref())))?
            .unwrap_or_default()
            .to_owned(),
    )
}

/// The one token of a request that may carry several (an `Authorization: Bearer` header and
/// `access_token` query parameters): the same token everywhere, or [`AuthError::Conflicting`].
pub fn one_token<'a>(
    candidates: impl IntoIterator<Item = &'a str>,
) -> Result<Option<&'a str>, AuthError> {
    let mut found: Option<&str> = None;
    for t in candidates {
        match found {
            Some(f) if f != t => return Err(AuthError::Conflicting),
            _ => found = Some(t),
        }
    }
    Ok(found)
}

/// Why an authenticated request is not allowed (close code 4003 / HTTP 403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Forbidden {
    #[error("org {0} not granted by the token")]
    Org(OrgId),
    #[error("token lacks the {0} scope")]
    Scope(&'static str),
}

/// Key and claim checks, from configuration.
#[derive(Clone)]
pub struct AuthConfig {
    pub alg: JwtAlg,
    /// HS256: the shared secret; others: the PEM public key.
    pub key: Vec<u8>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: u64,
    /// The key's id: a token that names another `kid` is refused (one without is accepted).
    pub kid: Option<String>,
    /// Tokens whose `exp` lies further ahead than this (plus the leeway) are refused.
    pub max_lifetime_secs: Option<u64>,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("alg", &self.alg)
            .field("key", &"<redacted>")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .field("kid", &self.kid)
            .field("max_lifetime_secs", &self.max_lifetime_secs)
            .finish()
    }
}

/// The claims edgestream reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub orgs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
}

/// The `aud` claim: one audience or several (RFC 7519 section 4.1.3 allows both).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// What a verified token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub sub: String,
    /// Unix seconds after which (plus leeway) the token is expired.
    pub exp: u64,
    orgs: Vec<OrgId>,
    all_orgs: bool,
    subscribe: bool,
    publish: bool,
    chat: bool,
    upload: bool,
}

impl Grant {
    /// Orgs named by the token (not `*`), the default subscription set.
    pub fn orgs(&self) -> &[OrgId] {
        &self.orgs
    }

    /// Subscribing needs the `subscribe` scope and the org named (`*` does not count).
    pub fn check_subscribe(&self, org: &OrgId) -> Result<(), Forbidden> {
        if !self.subscribe {
            return Err(Forbidden::Scope("subscribe"));
        }
        if !self.orgs.contains(org) {
            return Err(Forbidden::Org(org.clone()));
        }
        Ok(())
    }

    /// Chat needs the `chat` (or `publish`) scope and the org named or `*`.
    pub fn check_chat(&self, org: &OrgId) -> Result<(), Forbidden> {
        if !(self.chat || self.publish) {
            return Err(Forbidden::Scope("chat"));
        }
        self.check_org(org)
    }

    /// Uploads need the `upload` (or `publish`) scope and the org named or `*`.
    pub fn check_upload(&self, org: &OrgId) -> Result<(), Forbidden> {
        if !(self.upload || self.publish) {
            return Err(Forbidden::Scope("upload"));
        }
        self.check_org(org)
    }

    /// Reading who is in an org or its rooms (the presence routes, JOIN's member list) needs
    /// the org named by the token (`*` only publishes, PROTOCOL.md section 8) and the
    /// `subscribe` or `chat` scope.
    pub fn check_presence(&self, org: &OrgId) -> Result<(), Forbidden> {
        if !(self.subscribe || self.chat) {
            return Err(Forbidden::Scope("subscribe"));
        }
        self.check_named(org)
    }

    /// Reading an upload record needs the org named by the token (`*` only publishes,
    /// PROTOCOL.md section 8) and the `subscribe`, `upload` or `publish` scope.
    pub fn check_upload_record(&self, org: &OrgId) -> Result<(), Forbidden> {
        if !(self.subscribe || self.upload || self.publish) {
            return Err(Forbidden::Scope("upload"));
        }
        self.check_named(org)
    }

    fn check_named(&self, org: &OrgId) -> Result<(), Forbidden> {
        if !self.orgs.contains(org) {
            return Err(Forbidden::Org(org.clone()));
        }
        Ok(())
    }

    fn check_org(&self, org: &OrgId) -> Result<(), Forbidden> {
        if !(self.all_orgs || self.orgs.contains(org)) {
            return Err(Forbidden::Org(org.clone()));
        }
        Ok(())
    }

    /// Publishing needs the `publish` scope and the org named or `*`.
    pub fn check_publish(&self, org: &OrgId) -> Result<(), Forbidden> {
        if !self.publish {
            return Err(Forbidden::Scope("publish"));
        }
        self.check_org(org)
    }
}

/// Verifies tokens.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    leeway_secs: u64,
    kid: Option<String>,
    max_lifetime_secs: Option<u64>,
}

impl Authenticator {
    /// Loads the key. Errors name what is wrong with it (never its contents).
    pub fn new(cfg: &AuthConfig) -> Result<Self, String> {
        let key = match cfg.alg {
            JwtAlg::HS256 => {
                if cfg.key.len() < MIN_SECRET_BYTES {
                    return Err(format!(
                        "the JWT secret must be at least {MIN_SECRET_BYTES} bytes"
                    ));
                }
                Ok(DecodingKey::from_secret(&cfg.key))
            }
            JwtAlg::RS256 => DecodingKey::from_rsa_pem(&cfg.key),
            JwtAlg::ES256 => DecodingKey::from_ec_pem(&cfg.key),
            JwtAlg::EdDSA => DecodingKey::from_ed_pem(&cfg.key),
        }
        .map_err(|e| format!("cannot load the {:?} public key: {e}", cfg.alg))?;
        let mut validation = Validation::new(cfg.alg.algorithm());
        validation.leeway = cfg.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &cfg.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &cfg.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(Authenticator {
            key,
            validation,
            leeway_secs: cfg.leeway_secs,
            kid: cfg.kid.clone(),
            max_lifetime_secs: cfg.max_lifetime_secs,
        })
    }

    /// Seconds of clock skew tolerated.
    pub fn leeway_secs(&self) -> u64 {
        self.leeway_secs
    }

    /// Verifies a token: size, `kid`, signature, algorithm, `exp`, `nbf`, `iss`, `aud`, `sub`.
    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        if let Some(kid) = &self.kid {
            let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
            if header.kid.is_some_and(|k| &k != kid) {
                return Err(AuthError::UnknownKeyId);
            }
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| map_error(e.kind()))?;
        let c = data.claims;
        if c.sub.is_empty() {
            return Err(AuthError::MissingClaim("sub".into()));
        }
        if let Some(max) = self.max_lifetime_secs {
            let limit = crate::time::unix_secs()
                .saturating_add(max)
                .saturating_add(self.leeway_secs);
            if c.exp > limit {
                return Err(AuthError::LifetimeTooLong);
            }
        }
        // Scopes are separated by ASCII spaces only (RFC 8693 section 4.2): a tab or a
        // non-breaking space is part of a (so unknown) scope, never a separator.
        let scopes: HashSet<&str> = match &c.scope {
            Some(s) => s.split(' ').filter(|x| !x.is_empty()).collect(),
            None => HashSet::from(["subscribe"]),
        };
        let all_orgs = c.orgs.iter().any(|o| o == "*");
        let mut orgs: Vec<OrgId> = Vec::new();
        for o in c.orgs.iter().filter_map(|o| OrgId::parse(o).ok()) {
            if !orgs.contains(&o) {
                orgs.push(o);
            }
        }
        Ok(Grant {
            sub: c.sub,
            exp: c.exp,
            orgs,
            all_orgs,
            subscribe: scopes.contains("subscribe"),
            publish: scopes.contains("publish"),
            chat: scopes.contains("chat"),
            upload: scopes.contains("upload"),
        })
    }

    /// The instant (Unix ms) a grant stops being valid: `exp` plus the leeway.
    pub fn expires_at_ms(&self, grant: &Grant) -> u64 {
        grant
            .exp
            .saturating_add(self.leeway_secs)
            .saturating_mul(1000)
    }
}

fn map_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName => AuthError::WrongAlgorithm,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
        ErrorKind::InvalidSubject => AuthError::MissingClaim("sub".into()),
        _ => AuthError::Malformed,
    }
}

/// Mints an HS256 token (the `token` command and development mode).
pub fn mint_hs256(secret: &[u8], claims: &Claims) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 signing with an in-memory secret cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::unix_secs;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn auth() -> Authenticator {
        Authenticator::new(&AuthConfig {
            alg: JwtAlg::HS256,
            key: SECRET.to_vec(),
            issuer: None,
            audience: None,
            leeway_secs: 30,
            kid: None,
            max_lifetime_secs: None,
        })
        .unwrap()
    }

    fn claims(orgs: &[&str], scope: Option<&str>) -> Claims {
        Claims {
            sub: "alice".into(),
            exp: unix_secs() + 60,
            nbf: None,
            orgs: orgs.iter().map(|s| s.to_string()).collect(),
            scope: scope.map(str::to_string),
            iss: None,
            aud: None,
        }
    }

    #[test]
    fn grants() {
        let a = auth();
        let acme = OrgId::parse("acme").unwrap();
        let beta = OrgId::parse("beta").unwrap();
        let g = a
            .verify(&mint_hs256(SECRET, &claims(&["acme"], None)))
            .unwrap();
        assert!(g.check_subscribe(&acme).is_ok());
        assert_eq!(g.check_subscribe(&beta), Err(Forbidden::Org(beta.clone())));
        assert_eq!(g.check_publish(&acme), Err(Forbidden::Scope("publish")));
        let g = a
            .verify(&mint_hs256(SECRET, &claims(&["*"], Some("publish"))))
            .unwrap();
        assert!(
            g.check_publish(&beta).is_ok(),
            "* grants every org for publishing"
        );
        assert!(
            g.check_subscribe(&beta).is_err(),
            "* is not honoured for subscribing"
        );
        assert!(g.orgs().is_empty());
    }

    #[test]
    fn leeway_edges() {
        let a = auth();
        let mut c = claims(&["acme"], None);
        c.exp = unix_secs() - 20; // inside the 30 s leeway
        assert!(a.verify(&mint_hs256(SECRET, &c)).is_ok());
        c.exp = unix_secs() - 40;
        assert_eq!(a.verify(&mint_hs256(SECRET, &c)), Err(AuthError::Expired));
        c.exp = unix_secs() + 60;
        c.nbf = Some(unix_secs() + 20); // inside the leeway
        assert!(a.verify(&mint_hs256(SECRET, &c)).is_ok());
        c.nbf = Some(unix_secs() + 120);
        assert_eq!(
            a.verify(&mint_hs256(SECRET, &c)),
            Err(AuthError::NotYetValid)
        );
    }

    #[test]
    fn size_and_empty() {
        let a = auth();
        assert_eq!(a.verify(""), Err(AuthError::Missing));
        assert_eq!(
            a.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)),
            Err(AuthError::TooLarge)
        );
        assert_eq!(a.verify("not.a.jwt"), Err(AuthError::Malformed));
    }
}
