//! Publishing and reading over the HTTP API.

use serde_json::Value;

/// A thin client for one server.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
}

impl Api {
    pub fn new(base: impl Into<String>) -> Self {
        Api {
            base: base.into(),
            client: reqwest::Client::new(),
        }
    }

    /// POSTs a raw body to an org; returns the status and the JSON answer.
    pub async fn publish_raw(
        &self,
        token: &str,
        org: &str,
        body: impl Into<reqwest::Body>,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .client
            .post(format!("{}/v1/orgs/{org}/events", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = idempotency_key {
            req = req.header("idempotency-key", k);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let v = res.json().await.unwrap_or(Value::Null);
        Ok((status, v))
    }

    /// Publishes a JSON value (object or array) and expects 201.
    pub async fn publish(&self, token: &str, org: &str, body: &Value) -> anyhow::Result<Value> {
        let (status, v) = self
            .publish_raw(token, org, serde_json::to_vec(body)?, None)
            .await?;
        anyhow::ensure!(status == 201, "publish answered {status}: {v}");
        Ok(v)
    }

    /// GETs a path; returns the status and the JSON answer (Null when not JSON).
    pub async fn get(&self, path: &str, token: Option<&str>) -> anyhow::Result<(u16, Value)> {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let text = res.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }
}
