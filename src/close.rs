//! Close codes (PROTOCOL.md section 6) and the one place that maps errors to them and to HTTP
//! statuses.

use axum::http::StatusCode;

use crate::auth::{AuthError, Forbidden};
use crate::log::LogError;
use crate::model::ModelError;

/// A close code of PROTOCOL.md section 6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    Unauthorized = 4001,
    Forbidden = 4003,
    SlowConsumer = 4008,
    TokenExpired = 4009,
    TooMany = 4029,
    Protocol = 4400,
    TooLarge = 4413,
    Internal = 4500,
    GoingAway = 4503,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The HTTP status for the same condition.
    pub fn status(self) -> StatusCode {
        match self {
            CloseCode::Unauthorized | CloseCode::TokenExpired => StatusCode::UNAUTHORIZED,
            CloseCode::Forbidden => StatusCode::FORBIDDEN,
            CloseCode::TooMany => StatusCode::TOO_MANY_REQUESTS,
            CloseCode::Protocol => StatusCode::BAD_REQUEST,
            CloseCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            CloseCode::SlowConsumer | CloseCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            CloseCode::GoingAway => StatusCode::SERVICE_UNAVAILABLE,
        }
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
