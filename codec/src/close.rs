//! Close codes of the wire contract (section 6): WebSocket close codes and WebTransport session
//! error codes alike, with what each means and what a client should do. The server, the
//! WebSocket library and the test clients all name codes through this type.

/// A close code of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    pub const ALL: [CloseCode; 9] = [
        CloseCode::Unauthorized,
        CloseCode::Forbidden,
        CloseCode::SlowConsumer,
        CloseCode::TokenExpired,
        CloseCode::TooMany,
        CloseCode::Protocol,
        CloseCode::TooLarge,
        CloseCode::Internal,
        CloseCode::GoingAway,
    ];

    pub fn code(self) -> u16 {
        self as u16
    }

    /// The contract's code for a number, if it is one.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// What the code means (the contract's wording, short).
    pub fn meaning(self) -> &'static str {
        match self {
            CloseCode::Unauthorized => {
                "unauthorized: token missing, malformed, bad signature or expired"
            }
            CloseCode::Forbidden => "forbidden: an org the token does not grant",
            CloseCode::SlowConsumer => {
                "slow consumer: the client fell behind and its queue was dropped"
            }
            CloseCode::TokenExpired => "the token expired during the session",
            CloseCode::TooMany => "too many connections or requests",
            CloseCode::Protocol => "protocol error: a malformed query, frame or JSON",
            CloseCode::TooLarge => "too large: a message or upload over its limit",
            CloseCode::Internal => "internal error",
            CloseCode::GoingAway => "going away: the node is draining",
        }
    }

    /// Whether a client should reconnect after it (resuming with `since`): not after 4001,
    /// 4003, 4400 and 4413, which the same request would meet again.
    pub fn retry(self) -> bool {
        !matches!(
            self,
            CloseCode::Unauthorized
                | CloseCode::Forbidden
                | CloseCode::Protocol
                | CloseCode::TooLarge
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for c in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(c.code()), Some(c));
            assert!(!c.meaning().is_empty());
        }
        assert_eq!(CloseCode::from_code(1000), None);
        assert!(CloseCode::GoingAway.retry() && !CloseCode::Unauthorized.retry());
    }
}
