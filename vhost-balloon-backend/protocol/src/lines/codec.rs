//! The framing the project's JSON-lines protocols share: one JSON value a line, a version
//! field checked first, a string tag naming the command.

/// `value` as one JSON line (with its newline); a value that cannot be serialised becomes an
/// error reply, so a peer always gets a line.
pub fn json_line(value: &impl serde::Serialize) -> String {
    let mut text = serde_json::to_string(value)
        .unwrap_or_else(|_| r#"{"ok":false,"error":"reply not serialisable"}"#.to_string());
    text.push('\n');
    text
}

/// Why a line is not a request of a versioned JSON-lines protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("missing \"{0}\"")]
    MissingVersion(&'static str),
    #[error("unsupported protocol version {0}")]
    Version(u64),
    #[error("\"{0}\" must be a string")]
    TagNotString(&'static str),
    #[error("bad request: {0}")]
    Bad(String),
}

/// How the protocols frame a line: a JSON object whose `version_key` is `version` and whose
/// `tag_key` names the command (or message type).
#[derive(Debug, Clone, Copy)]
pub struct Framing {
    pub version_key: &'static str,
    pub tag_key: &'static str,
    pub version: u32,
}

/// Decodes one line of a protocol framed as `framing` says. The version is checked first, so
/// a peer of another version is told so rather than what it got wrong; the tag must be a
/// string (serde alone would also take a variant's index).
pub fn decode_versioned<T: serde::de::DeserializeOwned>(
    line: &str,
    framing: Framing,
) -> Result<T, DecodeError> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    match value.get(framing.version_key).and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(framing.version) => {}
        Some(v) => return Err(DecodeError::Version(v)),
        None => return Err(DecodeError::MissingVersion(framing.version_key)),
    }
    if value
        .get(framing.tag_key)
        .is_some_and(|tag| !tag.is_string())
    {
        return Err(DecodeError::TagNotString(framing.tag_key));
    }
    serde_json::from_value(value).map_err(|e| DecodeError::Bad(e.to_string()))
}
