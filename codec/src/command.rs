//! What a client asks of a session (PROTOCOL.md sections 2, 4.3, 8 and 9), one type whatever
//! the encoding: a binary frame ([`ClientCommand::from_frame`]) or a JSON text message
//! ([`ClientCommand::from_json`]). The server's session core handles only this type.

use bytes::Bytes;

use crate::frame::{Frame, MAX_PING_LEN};
use crate::json::ClientMessage;

/// A resume position as the client wrote it; the server validates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// A SUBSCRIBE frame's epoch (never empty here) and seq.
    Parts { epoch: String, seq: u64 },
    /// A JSON `since`: `epoch:seq`.
    Text(String),
}

/// One client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCommand {
    Subscribe {
        org: String,
        since: Option<Since>,
    },
    Unsubscribe {
        org: String,
    },
    Refresh {
        token: String,
    },
    /// PING with its body (binary: up to 64 bytes; JSON: the `data` string's bytes).
    Ping(Bytes),
    Join {
        org: String,
        room: String,
    },
    Leave {
        org: String,
        room: String,
    },
    /// CHAT: `body` is the JSON value as the client wrote it (validated by the server).
    Chat {
        org: String,
        room: String,
        id: String,
        body: Bytes,
    },
    UploadBegin {
        org: String,
        name: String,
        size: u64,
        upload_id: String,
        offset: u64,
    },
    UploadChunk {
        upload_id: String,
        offset: u64,
        bytes: Bytes,
    },
    /// A command this version does not know: skipped, for forward compatibility.
    Unknown,
}

/// Why a message is not a client command (a protocol error, 4400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("frame type {0:#04x} is not sent by clients")]
    NotFromClients(u64),
    #[error("{0}")]
    Json(String),
    #[error("ping data over 64 bytes")]
    PingTooLong,
}

impl ClientCommand {
    /// The command of a decoded binary frame.
    pub fn from_frame(frame: Frame) -> Result<Self, CommandError> {
        Ok(match frame {
            Frame::Subscribe { org, epoch, seq } => ClientCommand::Subscribe {
                org,
                since: (!epoch.is_empty()).then_some(Since::Parts { epoch, seq }),
            },
            Frame::Unsubscribe { org } => ClientCommand::Unsubscribe { org },
            Frame::Refresh { token } => ClientCommand::Refresh { token },
            Frame::Ping(body) => ClientCommand::Ping(body),
            Frame::Join { org, room } => ClientCommand::Join { org, room },
            Frame::Leave { org, room } => ClientCommand::Leave { org, room },
            Frame::Chat {
                org,
                room,
                id,
                body,
            } => ClientCommand::Chat {
                org,
                room,
                id,
                body,
            },
            Frame::UploadBegin {
                org,
                name,
                size,
                upload_id,
                offset,
                ..
            } => ClientCommand::UploadBegin {
                org,
                name,
                size,
                upload_id,
                offset,
            },
            Frame::UploadChunk {
                upload_id,
                offset,
                bytes,
            } => ClientCommand::UploadChunk {
                upload_id,
                offset,
                bytes,
            },
            Frame::Unknown { .. } => ClientCommand::Unknown,
            other => return Err(CommandError::NotFromClients(other.kind())),
        })
    }

    /// The command of a JSON text message.
    pub fn from_json(text: &str) -> Result<Self, CommandError> {
        let msg = ClientMessage::parse(text).map_err(|e| CommandError::Json(e.to_string()))?;
        Ok(match msg {
            ClientMessage::Subscribe { org, since } => ClientCommand::Subscribe {
                org,
                since: since.map(Since::Text),
            },
            ClientMessage::Unsubscribe { org } => ClientCommand::Unsubscribe { org },
            ClientMessage::Refresh { token } => ClientCommand::Refresh { token },
            ClientMessage::Ping { data } => {
                let data = data.unwrap_or_default();
                if data.len() > MAX_PING_LEN {
                    return Err(CommandError::PingTooLong);
                }
                ClientCommand::Ping(Bytes::from(data))
            }
            ClientMessage::Join { org, room } => ClientCommand::Join { org, room },
            ClientMessage::Leave { org, room } => ClientCommand::Leave { org, room },
            ClientMessage::Chat {
                org,
                room,
                id,
                body,
            } => ClientCommand::Chat {
                org,
                room,
                id,
                body: Bytes::copy_from_slice(body.get().as_bytes()),
            },
            ClientMessage::Unknown => ClientCommand::Unknown,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_encodings_give_the_same_command() {
        let pairs = [
            (
                Frame::Subscribe {
                    org: "acme".into(),
                    epoch: "e1".into(),
                    seq: 5,
                },
                r#"{"t":"subscribe","org":"acme","since":"e1:5"}"#,
            ),
            (
                Frame::Join {
                    org: "acme".into(),
                    room: "lobby".into(),
                },
                r#"{"t":"join","org":"acme","room":"lobby"}"#,
            ),
            (
                Frame::Chat {
                    org: "acme".into(),
                    room: "lobby".into(),
                    id: "m1".into(),
                    body: Bytes::from_static(br#"{"text":"hi"}"#),
                },
                r#"{"t":"chat","org":"acme","room":"lobby","id":"m1","body":{"text":"hi"}}"#,
            ),
            (
                Frame::Ping(Bytes::from_static(b"x")),
                r#"{"t":"ping","data":"x"}"#,
            ),
        ];
        for (frame, text) in pairs {
            let a = ClientCommand::from_frame(frame).unwrap();
            let b = ClientCommand::from_json(text).unwrap();
            match (&a, &b) {
                (
                    ClientCommand::Subscribe {
                        since: Some(Since::Parts { epoch, seq }),
                        ..
                    },
                    ClientCommand::Subscribe {
                        since: Some(Since::Text(t)),
                        ..
                    },
                ) => assert_eq!(format!("{epoch}:{seq}"), *t),
                _ => assert_eq!(a, b),
            }
        }
    }

    #[test]
    fn refusals() {
        assert_eq!(
            ClientCommand::from_frame(Frame::Pong(Bytes::new())),
            Err(CommandError::NotFromClients(0x06))
        );
        let long = format!(r#"{{"t":"ping","data":"{}"}}"#, "x".repeat(65));
        assert_eq!(
            ClientCommand::from_json(&long),
            Err(CommandError::PingTooLong)
        );
        assert!(ClientCommand::from_json("{").is_err());
        assert_eq!(
            ClientCommand::from_json(r#"{"t":"future"}"#),
            Ok(ClientCommand::Unknown)
        );
        assert_eq!(
            ClientCommand::from_frame(Frame::Subscribe {
                org: "a".into(),
                epoch: String::new(),
                seq: 9
            }),
            Ok(ClientCommand::Subscribe {
                org: "a".into(),
                since: None
            })
        );
    }
}
