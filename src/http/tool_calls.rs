//! Tool calls: the tools a request offers, the calls of its history, in OpenAI's and
//! Anthropic's shapes; and calls read out of a reply, in the Hermes form that Qwen 2.5 and 3, Hermes and SmolLM3
//! templates teach their models: `<tool_call>{"name": "f", "arguments": {...}}</tool_call>`,
//! one block per call, after any text. Only a `--jinja` template that teaches the form turns
//! this on (`ModelInfo::hermes_tool_calls`), and only for requests that offered tools.
//!
//! A block that is not a call (not JSON, no name, cut off by the token limit) stays text, as
//! llama.cpp leaves it: nothing the model wrote is dropped.

use serde_json::{Value, json};
use uuid::Uuid;

use super::error::ApiError;
use crate::engine::ToolCall;

/// OpenAI's `tools`, checked (each `{"type": "function", "function": {"name": …}}`); none when
/// `tool_choice` is `"none"`, since the model is then not to call any. Other choices cannot be
/// enforced and are taken as `"auto"`.
pub fn openai_tools(
    tools: Option<Vec<Value>>,
    choice: Option<&Value>,
) -> Result<Vec<Value>, ApiError> {
    let tools = tools.unwrap_or_default();
    for (index, tool) in tools.iter().enumerate() {
        let named = tool["function"]["name"]
            .as_str()
            .is_some_and(|n| !n.is_empty());
        if tool["type"] != "function" || !named {
            return Err(ApiError::bad_request(format!(
                "tools[{index}] must be {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"
            )));
        }
    }
    if choice.is_some_and(|c| c == "none") {
        return Ok(Vec::new());
    }
    Ok(tools)
}

/// Anthropic's `tools` (`{"name", "description", "input_schema"}`) in OpenAI's form, which
/// templates read. Anthropic's server tools (web search and the like, with a `type` of their
/// own) run on Anthropic's servers, not here, and are left out.
pub fn anthropic_tools(
    tools: Option<Vec<Value>>,
    choice: Option<&Value>,
) -> Result<Vec<Value>, ApiError> {
    if choice.is_some_and(|c| c["type"] == "none") {
        return Ok(Vec::new());
    }
    let mut offered = Vec::new();
    for (index, tool) in tools.unwrap_or_default().into_iter().enumerate() {
        if !tool["type"].is_null() && tool["type"] != "custom" {
            continue;
        }
        let Some(name) = tool["name"].as_str().filter(|n| !n.is_empty()) else {
            return Err(ApiError::bad_request(format!(
                "tools[{index}] needs a name"
            )));
        };
        let mut function = json!({ "name": name, "parameters": tool["input_schema"] });
        if let Some(description) = tool["description"].as_str() {
            function["description"] = json!(description);
        }
        offered.push(json!({ "type": "function", "function": function }));
    }
    Ok(offered)
}

/// A call in OpenAI's shape: its arguments are a JSON text.
pub fn openai_call(call: &ToolCall) -> Value {
    json!({
        "id": call.id,
        "type": "function",
        "function": { "name": call.name, "arguments": call.arguments.to_string() },
    })
}

/// A history's call from OpenAI's shape; its arguments must be a JSON object's text.
pub fn from_openai(index: usize, call: &Value) -> Result<ToolCall, ApiError> {
    let refuse = |what: &str| ApiError::bad_request(format!("tool_calls[{index}] {what}"));
    let name = call["function"]["name"]
        .as_str()
        .ok_or_else(|| refuse("needs function.name"))?;
    let arguments = match &call["function"]["arguments"] {
        Value::Null => json!({}),
        Value::String(text) if text.trim().is_empty() => json!({}),
        Value::String(text) => serde_json::from_str(text)
            .map_err(|_| refuse("has function.arguments that are not JSON"))?,
        other => other.clone(),
    };
    if !arguments.is_object() {
        return Err(refuse("has function.arguments that are not a JSON object"));
    }
    Ok(ToolCall {
        id: call["id"].as_str().unwrap_or_default().to_string(),
        name: name.to_string(),
        arguments,
    })
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// A whole reply: its text, and the calls after it.
#[derive(Debug, Default, PartialEq)]
pub struct Reply {
    pub text: String,
    pub calls: Vec<ToolCall>,
}

/// Reads a finished reply. Text before the first block is the reply's text (without the
/// white space that separates it from the block); when any block is not a call, the whole
/// reply is text.
pub fn read(reply: &str) -> Reply {
    let Some(start) = reply.find(OPEN) else {
        return text_only(reply);
    };
    let mut calls = Vec::new();
    let mut rest = &reply[start..];
    while !rest.is_empty() {
        let Some(body) = rest.strip_prefix(OPEN) else {
            return text_only(reply);
        };
        let Some(end) = body.find(CLOSE) else {
            return text_only(reply);
        };
        match call(&body[..end]) {
            Some(call) => calls.push(call),
            None => return text_only(reply),
        }
        rest = body[end + CLOSE.len()..].trim_start();
    }
    Reply {
        text: reply[..start].trim_end().to_string(),
        calls,
    }
}

/// `read` where the reply may hold calls; otherwise the whole reply is text.
pub fn read_if(calls_expected: bool, reply: String) -> Reply {
    if calls_expected {
        read(&reply)
    } else {
        Reply {
            text: reply,
            calls: Vec::new(),
        }
    }
}

fn text_only(reply: &str) -> Reply {
    Reply {
        text: reply.to_string(),
        calls: Vec::new(),
    }
}

/// One block's call: `{"name": string, "arguments": object}` (arguments may also come as a
/// string holding the object, or be missing: no arguments).
fn call(block: &str) -> Option<ToolCall> {
    let value: Value = serde_json::from_str(block.trim()).ok()?;
    let name = value.get("name")?.as_str()?.to_string();
    let arguments = match value.get("arguments") {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(Value::String(text)) => serde_json::from_str(text).ok()?,
        Some(other) => other.clone(),
    };
    if !arguments.is_object() {
        return None;
    }
    Some(ToolCall {
        id: format!("call_{}", Uuid::new_v4().simple()),
        name,
        arguments,
    })
}

/// A streamed reply's text as it may be shown: everything before a `<tool_call>` (or what may
/// become one) goes out at once; from there on the text is held until the reply ends, when
/// `finish` reads the calls (or gives the held text back, when it holds none).
#[derive(Debug, Default)]
pub struct StreamedReply {
    shown: String,
    held: String,
}

impl StreamedReply {
    /// The part of `piece` that may be shown now.
    pub fn push(&mut self, piece: &str) -> String {
        self.held.push_str(piece);
        let showable = match self.held.find(OPEN) {
            Some(start) => start,
            // Keep back a tail that could still grow into the marker.
            None => self.held.len() - partial_marker_len(&self.held),
        };
        // Only the block's separating white space is kept back with it.
        let showable = self.held[..showable].trim_end().len();
        let out: String = self.held.drain(..showable).collect();
        self.shown.push_str(&out);
        out
    }

    /// At the end: the text still to show and the calls.
    pub fn finish(self) -> Reply {
        let whole = read(&(self.shown.clone() + &self.held));
        if whole.calls.is_empty() {
            Reply {
                text: self.held,
                calls: Vec::new(),
            }
        } else {
            Reply {
                // What was held before the first block is white space, cut from the text.
                text: String::new(),
                calls: whole.calls,
            }
        }
    }
}

/// How many bytes at the end of `text` are the start of `<tool_call>`.
fn partial_marker_len(text: &str) -> usize {
    (1..OPEN.len())
        .rev()
        .find(|&n| text.ends_with(&OPEN[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn calls_after_text_are_read_out() {
        let reply = read(
            "Let me look.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>{\"name\": \"time\", \"arguments\": \"{}\"}</tool_call>",
        );
        assert_eq!(reply.text, "Let me look.");
        let named: Vec<_> = reply
            .calls
            .iter()
            .map(|c| (c.name.as_str(), c.arguments.clone()))
            .collect();
        assert_eq!(
            named,
            [("weather", json!({"city": "Oslo"})), ("time", json!({}))]
        );
        assert!(reply.calls[0].id.starts_with("call_"));
    }

    #[test]
    fn anything_that_is_not_a_call_stays_text() {
        for reply in [
            "No tools here.",
            "<tool_call>not json</tool_call>",
            "<tool_call>{\"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"cut\", \"argum",
            "<tool_call>{\"name\": \"a\"}</tool_call> and text after",
            "<tool_call>{\"name\": \"a\", \"arguments\": [1]}</tool_call>",
        ] {
            assert_eq!(read(reply), text_only(reply), "{reply}");
        }
    }

    #[test]
    fn a_stream_shows_text_and_holds_what_may_be_a_call() {
        let mut streamed = StreamedReply::default();
        let pieces = ["Sure", ". <tool", "_call>{\"name\": ", "\"f\"}</tool_call>"];
        let shown: Vec<String> = pieces.iter().map(|p| streamed.push(p)).collect();
        assert_eq!(shown, ["Sure", ".", "", ""]);
        let end = streamed.finish();
        assert_eq!(end.text, "");
        assert_eq!(end.calls.len(), 1);
        assert_eq!(end.calls[0].name, "f");

        // A '<' that starts no call is shown once it is known not to.
        let mut streamed = StreamedReply::default();
        assert_eq!(streamed.push("a <"), "a");
        assert_eq!(streamed.push("b> c"), " <b> c");
        let end = streamed.finish();
        assert_eq!((end.text.as_str(), end.calls.len()), ("", 0));

        // A block that is no call is given back as text at the end.
        let mut streamed = StreamedReply::default();
        assert_eq!(streamed.push("x <tool_call>oops"), "x");
        let end = streamed.finish();
        assert_eq!(
            (end.text.as_str(), end.calls.len()),
            (" <tool_call>oops", 0)
        );
    }
}
