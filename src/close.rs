//! Close codes (PROTOCOL.md section 6) and the one place that maps errors to them and to HTTP
//! statuses.

use axum::http::StatusCode;

use crate::auth::{AuthError, Forbidden};
use crate::log::LogError;
use crate::model::ModelError;

/// The contract's close codes live in the codec crate, shared with the WebSocket library and
/// the test clients.
pub use edgestream_codec::CloseCode;

/// The HTTP status for the same condition as a close code.
pub fn status(code: CloseCode) -> StatusCode {
    match code {
        CloseCode::Unauthorized | CloseCode::TokenExpired => StatusCode::UNAUTHORIZED,
        CloseCode::Forbidden => StatusCode::FORBIDDEN,
        CloseCode::TooMany => StatusCode::TOO_MANY_REQUESTS,
        CloseCode::Protocol => StatusCode::BAD_REQUEST,
        CloseCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        CloseCode::SlowConsumer | CloseCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        CloseCode::GoingAway => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// A close code with its reason, ready for a transport to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: CloseCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        Refusal {
            code,
            reason: reason.into(),
        }
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        Refusal::new(CloseCode::Unauthorized, e.to_string())
    }
}

impl From<Forbidden> for Refusal {
    fn from(e: Forbidden) -> Self {
        Refusal::new(CloseCode::Forbidden, e.to_string())
    }
}

impl From<ModelError> for Refusal {
    fn from(e: ModelError) -> Self {
        Refusal::new(CloseCode::Protocol, e.to_string())
    }
}

impl From<LogError> for Refusal {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Unavailable(_) | LogError::Indeterminate(_) => {
                Refusal::new(CloseCode::GoingAway, "log unavailable")
            }
            LogError::Internal(_) => Refusal::new(CloseCode::Internal, "internal error"),
        }
    }
}

impl From<edgestream_codec::DecodeError> for Refusal {
    fn from(e: edgestream_codec::DecodeError) -> Self {
        match e {
            edgestream_codec::DecodeError::TooLarge { .. } => {
                Refusal::new(CloseCode::TooLarge, e.to_string())
            }
            _ => Refusal::new(CloseCode::Protocol, e.to_string()),
        }
    }
}
