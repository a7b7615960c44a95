//! The JSON format of the WebSocket transport (PROTOCOL.md section 4.3).
//!
//! One JSON object per text message with a `t` field. Server messages are written directly
//! (the event payload is embedded verbatim, never re-serialised); client messages are parsed
//! with serde. Unknown `t` values parse to [`ClientMessage::Unknown`] so receivers can skip them,
//! like unknown binary frame types.

use serde::Deserialize;
use std::fmt::Write as _;

use crate::frame::Resume;

/// A message from a client in the JSON format.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub enum ClientMessage {
    /// `{"t":"subscribe","org":"acme","since":"k3x9:41"}`; `since` is optional.
    Subscribe {
        org: String,
        #[serde(default)]
        since: Option<String>,
    },
    /// `{"t":"unsubscribe","org":"acme"}`
    Unsubscribe { org: String },
    /// `{"t":"refresh","token":"..."}`
    Refresh { token: String },
    /// `{"t":"ping","data":"..."}`; `data` is optional and echoed in the pong.
    Ping {
        #[serde(default)]
        data: Option<String>,
    },
    /// `{"t":"join","org":"acme","room":"lobby"}`
    Join { org: String, room: String },
    /// `{"t":"leave","org":"acme","room":"lobby"}`
    Leave { org: String, room: String },
    /// `{"t":"chat","org":"acme","room":"lobby","id":"m-1","body":{"text":"hi"}}`
    Chat {
        org: String,
        room: String,
        id: String,
        /// Read by [`ClientMessage::parse`] in a second pass: serde's internally tagged enums
        /// buffer their fields as values, which cannot hold raw JSON.
        #[serde(skip)]
        body: RawJson,
    },
    /// A message type this version does not know; receivers skip it.
    #[serde(other)]
    Unknown,
}

/// A JSON value kept as the client wrote it (validated, never re-serialised: a value type
/// would round `12345678901234567890123` and refuse `1e99999`).
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct RawJson(pub Box<serde_json::value::RawValue>);

impl Default for RawJson {
    fn default() -> Self {
        RawJson(serde_json::value::RawValue::from_string("null".into()).expect("valid JSON"))
    }
}

impl RawJson {
    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for RawJson {}

/// Why a client JSON message could not be parsed (a protocol error, close code 4400).
#[derive(Debug, thiserror::Error)]
#[error("malformed JSON message: {0}")]
pub struct JsonError(#[from] serde_json::Error);

impl ClientMessage {
    /// Parses one text message.
    pub fn parse(text: &str) -> Result<Self, JsonError> {
        let mut m: ClientMessage = serde_json::from_str(text)?;
        if let ClientMessage::Chat { body, .. } = &mut m {
            #[derive(Deserialize)]
            struct Body {
                body: RawJson,
            }
            *body = serde_json::from_str::<Body>(text)?.body;
        }
        Ok(m)
    }
}

fn quoted(s: &str) -> String {
    // serde_json escapes exactly as JSON requires; strings here are short (ids, messages).
    serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""))
}

/// `{"t":"subscribed",...}`
pub fn subscribed(org: &str, epoch: &str, head: u64, resume: Resume) -> String {
    format!(
        r#"{{"t":"subscribed","org":{},"epoch":{},"head":{head},"resume":"{}"}}"#,
        quoted(org),
        quoted(epoch),
        resume.as_str()
    )
}

/// `{"t":"event",...,"data":<payload verbatim>}`. `data` must be a JSON text (the server only
/// accepts JSON objects for publishing, so logged payloads always are).
pub fn event(org: &str, seq: u64, ts: u64, data: &str) -> String {
    let org = quoted(org);
    let mut s = String::with_capacity(48 + org.len() + data.len());
    let _ = write!(
        s,
        r#"{{"t":"event","org":{org},"seq":{seq},"ts":{ts},"data":{data}}}"#
    );
    s
}

/// `{"t":"reset",...}`
pub fn reset(org: &str, epoch: &str, head: u64) -> String {
    format!(
        r#"{{"t":"reset","org":{},"epoch":{},"head":{head}}}"#,
        quoted(org),
        quoted(epoch)
    )
}

/// `{"t":"heartbeat","ts":...,"heads":{"acme":42}}`
pub fn heartbeat<'a>(ts: u64, heads: impl IntoIterator<Item = (&'a str, u64)>) -> String {
    let mut s = format!(r#"{{"t":"heartbeat","ts":{ts},"heads":{{"#);
    for (i, (org, head)) in heads.into_iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{}:{head}", quoted(org));
    }
    s.push_str("}}");
    s
}

/// `{"t":"error","code":4003,"message":"..."}`
pub fn error(code: u64, message: &str) -> String {
    format!(
        r#"{{"t":"error","code":{code},"message":{}}}"#,
        quoted(message)
    )
}

/// `{"t":"pong","data":"..."}`
pub fn pong(data: &str) -> String {
    format!(r#"{{"t":"pong","data":{}}}"#, quoted(data))
}

/// `{"t":"unsubscribed","org":"acme"}`
pub fn unsubscribed(org: &str) -> String {
    format!(r#"{{"t":"unsubscribed","org":{}}}"#, quoted(org))
}

/// `{"t":"chat_ack","id":"m-1","seq":42}`
pub fn chat_ack(id: &str, seq: u64) -> String {
    format!(r#"{{"t":"chat_ack","id":{},"seq":{seq}}}"#, quoted(id))
}

/// `{"t":"presence","org":"acme","room":"lobby","online":2,"changes":[{"user":"alice","joined":true}]}`
pub fn presence(org: &str, room: &str, online: u64, changes: &[(String, bool)]) -> String {
    let mut out = format!(
        r#"{{"t":"presence","org":{},"room":{},"online":{online},"changes":["#,
        quoted(org),
        quoted(room),
    );
    for (i, (user, joined)) in changes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(r#"{"user":"#);
        out.push_str(&quoted(user));
        out.push_str(r#","joined":"#);
        out.push_str(if *joined { "true" } else { "false" });
        out.push('}');
    }
    out.push_str("]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn presence_batches_are_json_with_a_change_list() {
        let changes = vec![("a\"b".to_string(), true), ("c".to_string(), false)];
        let v: Value = serde_json::from_str(&presence("acme", "", 1, &changes)).unwrap();
        assert_eq!(
            v,
            json!({"t": "presence", "org": "acme", "room": "", "online": 1,
                   "changes": [{"user": "a\"b", "joined": true}, {"user": "c", "joined": false}]})
        );
        let v: Value = serde_json::from_str(&presence("acme", "lobby", 5000, &[])).unwrap();
        assert_eq!(v["changes"], json!([]));
    }

    fn v(s: &str) -> Value {
        serde_json::from_str(s).expect("valid JSON")
    }

    #[test]
    fn server_messages_are_valid_json_with_the_documented_fields() {
        assert_eq!(
            v(&subscribed("acme", "k3x9", 41, Resume::Recovered)),
            json!({"t":"subscribed","org":"acme","epoch":"k3x9","head":41,"resume":"recovered"})
        );
        assert_eq!(
            v(&event("acme", 42, 1_763_900_000_123, r#"{"a":[1,"x"]}"#)),
            json!({"t":"event","org":"acme","seq":42,"ts":1_763_900_000_123u64,"data":{"a":[1,"x"]}})
        );
        assert_eq!(
            v(&reset("acme", "e", 57)),
            json!({"t":"reset","org":"acme","epoch":"e","head":57})
        );
        assert_eq!(
            v(&heartbeat(5, [("acme", 42), ("beta", 0)])),
            json!({"t":"heartbeat","ts":5,"heads":{"acme":42,"beta":0}})
        );
        assert_eq!(
            v(&heartbeat(5, [])),
            json!({"t":"heartbeat","ts":5,"heads":{}})
        );
        assert_eq!(
            v(&error(4003, "org \"x\" not granted")),
            json!({"t":"error","code":4003,"message":"org \"x\" not granted"})
        );
        assert_eq!(v(&pong("a\nb")), json!({"t":"pong","data":"a\nb"}));
        assert_eq!(
            v(&unsubscribed("acme")),
            json!({"t":"unsubscribed","org":"acme"})
        );
    }

    #[test]
    fn client_messages_parse() {
        assert_eq!(
            ClientMessage::parse(r#"{"t":"subscribe","org":"acme","since":"k3x9:41"}"#).unwrap(),
            ClientMessage::Subscribe {
                org: "acme".into(),
                since: Some("k3x9:41".into())
            }
        );
        assert_eq!(
            ClientMessage::parse(r#"{"t":"subscribe","org":"acme"}"#).unwrap(),
            ClientMessage::Subscribe {
                org: "acme".into(),
                since: None
            }
        );
        assert_eq!(
            ClientMessage::parse(r#"{"t":"ping"}"#).unwrap(),
            ClientMessage::Ping { data: None }
        );
        assert_eq!(
            ClientMessage::parse(r#"{"t":"future-thing","x":1}"#).unwrap(),
            ClientMessage::Unknown
        );
        assert!(ClientMessage::parse(r#"{"org":"acme"}"#).is_err());
        assert!(ClientMessage::parse(r#"{"t":"subscribe"}"#).is_err());
        assert!(ClientMessage::parse("not json").is_err());
        assert!(ClientMessage::parse(r#"{"t":"refresh","token":5}"#).is_err());
    }
}
