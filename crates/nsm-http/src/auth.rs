//! HTTP basic authentication against bcrypt hashes, as Prometheus' web config does it.
//!
//! bcrypt is slow on purpose (tens of milliseconds at cost 10), so a verification runs on
//! tokio's blocking pool, at most [`CONCURRENT_VERIFICATIONS`] at a time, and its result is
//! remembered by a SHA-256 digest of the user, the password and the hash: a scrape every few
//! seconds costs one bcrypt, not one per scrape; the same wrong credentials sent again cost
//! none; and a flood of new wrong passwords queues behind the limit (and the connection
//! limit) instead of taking every core from the pipeline.

use std::collections::{HashMap, HashSet};
#[cfg(test)]
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use tokio::sync::Semaphore;

const CONCURRENT_VERIFICATIONS: usize = 2;
/// Verified credentials remembered; beyond this the memory starts over.
const MAX_REMEMBERED: usize = 1024;
const CHALLENGE: &str = "Basic realm=\"nsm\", charset=\"UTF-8\"";

/// The users allowed in, each with the bcrypt hash of their password.
pub struct BasicAuth {
    users: HashMap<String, String>,
    /// Any configured hash: an unknown user is checked against it (and refused whatever the
    /// result), so a response time does not tell which user names exist.
    decoy_hash: String,
    verified: Mutex<HashSet<[u8; 32]>>,
    /// Credentials found wrong, kept apart so a flood of them never pushes out good ones.
    refused: Mutex<HashSet<[u8; 32]>>,
    verifications: Semaphore,
    /// bcrypt verifications run, for tests.
    #[cfg(test)]
    bcrypt_runs: AtomicUsize,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&String> = self.users.keys().collect();
        f.debug_struct("BasicAuth").field("users", &names).finish()
    }
}

impl BasicAuth {
    /// Users and their bcrypt hashes; `None` when there is none.
    pub fn new<'a>(users: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<Arc<Self>> {
        let users: HashMap<String, String> = users
            .into_iter()
            .map(|(name, hash)| (name.to_string(), hash.to_string()))
            .collect();
        let decoy_hash = users.values().next()?.clone();
        Some(Arc::new(Self {
            users,
            decoy_hash,
            verified: Mutex::new(HashSet::new()),
            refused: Mutex::new(HashSet::new()),
            verifications: Semaphore::new(CONCURRENT_VERIFICATIONS),
            #[cfg(test)]
            bcrypt_runs: AtomicUsize::new(0),
        }))
    }

    /// True when `headers` carry the credentials of a configured user.
    pub async fn allows(&self, headers: &HeaderMap) -> bool {
        let Some((user, password)) = credentials(headers) else {
            return false;
        };
        let (hash, known) = match self.users.get(&user) {
            Some(hash) => (hash.clone(), true),
            None => (self.decoy_hash.clone(), false),
        };
        let digest = digest(&user, &password, &hash);
        if let Some(allowed) = self.remembered(&digest) {
            return allowed;
        }
        let Ok(_permit) = self.verifications.acquire().await else {
            return false;
        };
        // Verified meanwhile by a request that queued before this one.
        if let Some(allowed) = self.remembered(&digest) {
            return allowed;
        }
        #[cfg(test)]
        self.bcrypt_runs.fetch_add(1, Ordering::Relaxed);
        let matches = tokio::task::spawn_blocking(move || {
            bcrypt::verify(password.as_bytes(), &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        let allowed = known && matches;
        let set = if allowed {
            &self.verified
        } else {
            &self.refused
        };
        let mut remembered = set.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if remembered.len() >= MAX_REMEMBERED {
            remembered.clear();
        }
        remembered.insert(digest);
        allowed
    }

    /// True when `headers` carry credentials already verified, without ever running bcrypt:
    /// for answers that must stay cheap to anyone, such as `/readyz`.
    pub fn allows_remembered(&self, headers: &HeaderMap) -> bool {
        let Some((user, password)) = credentials(headers) else {
            return false;
        };
        self.users
            .get(&user)
            .is_some_and(|hash| self.remembered(&digest(&user, &password, hash)) == Some(true))
    }

    /// What the credentials of `digest` were found to be, if they were checked before.
    fn remembered(&self, digest: &[u8; 32]) -> Option<bool> {
        let contains = |set: &Mutex<HashSet<[u8; 32]>>| {
            set.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .contains(digest)
        };
        if contains(&self.verified) {
            Some(true)
        } else if contains(&self.refused) {
            Some(false)
        } else {
            None
        }
    }
}

/// The user and password of an `Authorization: Basic ...` header.
fn credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

fn digest(user: &str, password: &str, hash: &str) -> [u8; 32] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [user, password, hash] {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part.as_bytes());
    }
    let mut digest = [0; 32];
    digest.copy_from_slice(context.finish().as_ref());
    digest
}

/// The bcrypt hash of a password, for `[http.basic_auth] users`.
pub fn hash_password(password: &str, cost: u32) -> Result<String, crate::HttpError> {
    bcrypt::hash(password, cost).map_err(|error| crate::HttpError::Auth(error.to_string()))
}

/// Middleware: the request goes on with valid credentials, and gets 401 with a challenge
/// otherwise.
pub(crate) async fn require(
    State(auth): State<Arc<BasicAuth>>,
    request: Request,
    next: Next,
) -> Response {
    if auth.allows(request.headers()).await {
        next.run(request).await
    } else {
        unauthorized()
    }
}

pub(crate) fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, CHALLENGE)],
        "unauthorized\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn basic(user: &str, password: &str) -> HeaderMap {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).expect("header"),
        );
        headers
    }

    #[tokio::test]
    async fn only_a_configured_user_with_the_right_password_is_allowed() {
        let hash = hash_password("correct horse", 4).expect("hash");
        let other = hash_password("battery staple", 4).expect("hash");
        let auth = BasicAuth::new([("prometheus", hash.as_str()), ("grafana", other.as_str())])
            .expect("users");
        assert!(auth.allows(&basic("prometheus", "correct horse")).await);
        // Remembered now; still right.
        assert!(auth.allows(&basic("prometheus", "correct horse")).await);
        assert!(auth.allows(&basic("grafana", "battery staple")).await);
        assert!(!auth.allows(&basic("prometheus", "battery staple")).await);
        assert!(!auth.allows(&basic("prometheus", "correct horse ")).await);
        // Another user's password with an unknown name never passes.
        assert!(!auth.allows(&basic("nobody", "correct horse")).await);
        assert!(!auth.allows(&HeaderMap::new()).await);
        let mut bearer = HeaderMap::new();
        bearer.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert!(!auth.allows(&bearer).await);
        assert!(BasicAuth::new([]).is_none());
    }

    #[tokio::test]
    async fn wrong_credentials_cost_one_bcrypt_and_remembered_checks_none() {
        let hash = hash_password("correct horse", 4).expect("hash");
        let auth = BasicAuth::new([("prometheus", hash.as_str())]).expect("users");
        let runs = || auth.bcrypt_runs.load(Ordering::Relaxed);
        // Never verified: refused without bcrypt, even with the right password.
        assert!(!auth.allows_remembered(&basic("prometheus", "correct horse")));
        assert_eq!(runs(), 0);
        for _ in 0..10 {
            assert!(!auth.allows(&basic("prometheus", "wrong")).await);
            assert!(!auth.allows(&basic("nobody", "wrong")).await);
        }
        assert_eq!(runs(), 2, "each wrong pair is checked once");
        assert!(auth.allows(&basic("prometheus", "correct horse")).await);
        assert!(auth.allows_remembered(&basic("prometheus", "correct horse")));
        assert!(!auth.allows_remembered(&basic("prometheus", "wrong")));
        assert!(!auth.allows_remembered(&basic("nobody", "wrong")));
        assert_eq!(runs(), 3);
    }
}
