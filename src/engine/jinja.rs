//! `--jinja`: a chat rendered by the model's own Jinja template (or `--chat-template-file`), as
//! llama-server renders it with `--jinja`, instead of by llama.cpp's built-in templates. The
//! template sees what llama-server's sees: each message's `role` and `content`, its
//! `reasoning_content` when it has one (a reply's earlier thinking, which templates such as
//! Qwen3's render in `<think>` tags), a reply's `tool_calls` and a tool answer's
//! `tool_call_id`, the request's `tools` when it has any, `bos_token`, `eos_token`,
//! `add_generation_prompt` and `enable_thinking`. minijinja runs it, with Python's string methods (`strip`, `startswith`,
//! ...) and loop controls, which Hugging Face templates use.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, Error, ErrorKind, context};

use super::ChatMessage;

const NAME: &str = "chat";

/// The vocabulary's BOS and EOS texts, which templates print, and whether its tokenizer adds
/// them itself (then a rendered prompt's own are cut off, as llama.cpp cuts them).
#[derive(Debug, Clone, Default)]
pub struct SpecialEnds {
    pub bos_token: String,
    pub eos_token: String,
    pub adds_bos: bool,
    pub adds_eos: bool,
}

pub struct JinjaTemplate {
    env: Environment<'static>,
    ends: SpecialEnds,
    /// The template teaches the model to call tools in the Hermes form (`tool_calls.rs`).
    hermes_tool_calls: bool,
    /// The template renders a system message (Gemma 2's refuses one): when it does not, a
    /// system message is merged into the next message, as llama.cpp merges it.
    system_role: bool,
}

impl JinjaTemplate {
    /// Compiles `source`; the error is a sentence naming what in it minijinja refused.
    pub fn new(source: String, ends: SpecialEnds) -> Result<Self, String> {
        let mut env = Environment::new();
        // Hugging Face renders templates with trim_blocks and lstrip_blocks, as llama.cpp does.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| format!("the chat template's syntax settings: {e}"))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        // llama.cpp tells a template's tool-call form by the markers in its text, as here.
        let hermes_tool_calls = source.contains("<tool_call>");
        env.add_template_owned(NAME, without_generation_blocks(&source))
            .map_err(|e| format!("the chat template does not compile: {e:#}"))?;
        let mut template = Self {
            env,
            ends,
            hermes_tool_calls,
            system_role: true,
        };
        template.system_role = template.renders_a_system_message();
        Ok(template)
    }

    /// Whether a system message comes out of the template (llama.cpp probes it the same way).
    fn renders_a_system_message(&self) -> bool {
        const PROBE: &str = "kvsnap-system-probe";
        let message = |role: &str, content: &str| ChatMessage {
            role: role.into(),
            content: content.into(),
            ..ChatMessage::default()
        };
        let probe = [message("system", PROBE), message("user", "hi")];
        self.render_as_given(&probe, &[], true)
            .is_ok_and(|rendered| rendered.contains(PROBE))
    }

    /// Whether replies call tools as `<tool_call>{"name": …, "arguments": …}</tool_call>`.
    pub fn hermes_tool_calls(&self) -> bool {
        self.hermes_tool_calls
    }

    /// The prompt `messages` render to, ending with the assistant's turn when
    /// `add_generation_prompt`. A leading BOS and a trailing EOS that the tokenizer adds itself
    /// are cut off, as llama.cpp cuts them.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        match messages.split_first() {
            Some((system, rest)) if system.role == "system" && !self.system_role => {
                let mut rest = rest.to_vec();
                if let Some(next) = rest.first_mut() {
                    next.content = format!("{}\n{}", system.content, next.content);
                }
                self.render_as_given(&rest, tools, add_generation_prompt)
            }
            _ => self.render_as_given(messages, tools, add_generation_prompt),
        }
    }

    fn render_as_given(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let messages: Vec<Value> = messages.iter().map(message_value).collect();
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| format!("the chat template is missing: {e}"))?;
        // llama.cpp leaves it undefined rather than false when no turn is to follow.
        let generation = if add_generation_prompt {
            context! { add_generation_prompt => true }
        } else {
            context! {}
        };
        // Like llama.cpp, `tools` is defined only when there are some.
        let tools = if tools.is_empty() {
            context! {}
        } else {
            context! { tools => Value::from(Serde(tools)) }
        };
        let context = minijinja::value::merge_maps([
            context! {
                messages => messages,
                bos_token => &self.ends.bos_token,
                eos_token => &self.ends.eos_token,
                enable_thinking => true,
            },
            generation,
            tools,
        ]);
        let rendered = template.render(context).map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => {
                format!("the chat template refused the messages: {e}")
            }
            _ => format!("the chat template failed: {e:#}"),
        })?;
        let ends = &self.ends;
        let rendered = match rendered.strip_prefix(ends.bos_token.as_str()) {
            Some(rest) if ends.adds_bos && !ends.bos_token.is_empty() => rest.to_string(),
            _ => rendered,
        };
        Ok(match rendered.strip_suffix(ends.eos_token.as_str()) {
            Some(rest) if ends.adds_eos && !ends.eos_token.is_empty() => rest.to_string(),
            _ => rendered,
        })
    }
}

/// `source` with Hugging Face's `{% generation %}` blocks (which mark the assistant's text for
/// training and render as their contents) written as `{% if true %}` blocks, which minijinja
/// knows; their whitespace control stays as it was.
fn without_generation_blocks(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        // The tag's end is looked for after its opening, so `{%}` is no tag.
        let Some(length) = rest[start + 2..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + 2 + length + 2];
        let inner = tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+');
        let replacement = match inner.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        out.push_str(&rest[..start]);
        match replacement {
            Some(statement) => out.push_str(&tag.replacen(inner.trim(), statement, 1)),
            None => out.push_str(tag),
        }
        rest = &rest[start + tag.len()..];
    }
    out.push_str(rest);
    out
}

/// A message as llama-server hands it to a template: `reasoning_content`, `tool_calls` and
/// `tool_call_id` only when present.
fn message_value(message: &ChatMessage) -> Value {
    let mut extra = Vec::new();
    if !message.reasoning.is_empty() {
        extra.push(context! { reasoning_content => &message.reasoning });
    }
    if !message.tool_calls.is_empty() {
        let calls: Vec<serde_json::Value> = message
            .tool_calls
            .iter()
            .map(|call| {
                serde_json::json!({
                    "id": call.id,
                    "type": "function",
                    "function": { "name": call.name, "arguments": call.arguments },
                })
            })
            .collect();
        extra.push(context! { tool_calls => Value::from(Serde(&calls)) });
    }
    if !message.tool_call_id.is_empty() {
        extra.push(context! { tool_call_id => &message.tool_call_id });
    }
    let base = context! { role => &message.role, content => &message.content };
    minijinja::value::merge_maps(std::iter::once(base).chain(extra))
}

/// Templates call it to refuse messages they cannot render (roles out of order, say).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// The local time in a strftime format (Llama 3's templates print today's date); a format
/// chrono cannot read is an error, not a panic.
fn strftime_now(format: String) -> Result<String, Error> {
    let mut text = String::new();
    write!(text, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now cannot use the format {format:?}"),
        )
    })?;
    Ok(text)
}

/// Python's `json.dumps` as templates expect it: `", "` and `": "` between items, no HTML
/// escaping (minijinja's own escapes `<` and `>`, which would change the prompt), and
/// `indent` when asked. `ensure_ascii` is accepted; non-ASCII text is kept as it is.
fn tojson(value: Value, options: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = options.get("indent")?;
    let _: Option<bool> = options.get("ensure_ascii")?;
    options.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = match indent {
        Some(width) => {
            let indent = " ".repeat(width);
            write_json(
                &json,
                serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes()),
            )
        }
        None => write_json(&json, PythonSeparators),
    }?;
    Ok(Value::from_safe_string(text))
}

fn write_json(
    json: &serde_json::Value,
    formatter: impl serde_json::ser::Formatter,
) -> Result<String, Error> {
    let mut bytes = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut bytes, formatter);
    serde::Serialize::serialize(json, &mut serializer)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    String::from_utf8(bytes)
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, "tojson wrote no UTF-8"))
}

/// serde_json's compact output with Python's separators.
struct PythonSeparators;

impl serde_json::ser::Formatter for PythonSeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.begin_array_value(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(role: &str, content: &str, reasoning: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            reasoning: reasoning.into(),
            ..ChatMessage::default()
        }
    }

    /// A ChatML template with Qwen3's habits: thinking in `<think>` tags, Python string
    /// methods, a loop that breaks.
    const THINKING: &str = "\
{%- for message in messages %}
{%- if message.role == 'assistant' and message.reasoning_content is defined %}
<|im_start|>assistant
<think>
{{ message.reasoning_content.strip() }}
</think>

{{ message.content.lstrip() }}<|im_end|>
{%- else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{%- endif %}
{%- if message.content.startswith('STOP') %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{%- endif %}";

    #[test]
    fn reasoning_renders_where_the_template_puts_it() {
        let template = JinjaTemplate::new(THINKING.into(), SpecialEnds::default()).unwrap();
        let rendered = template
            .render(
                &[
                    message("user", "Hi", ""),
                    message("assistant", "  Hello.", " I greet back. "),
                    message("user", "STOP here", ""),
                    message("user", "never shown", ""),
                ],
                &[],
                true,
            )
            .unwrap();
        assert_eq!(
            rendered,
            // `{%-` takes the line breaks after each `<|im_end|>` away.
            "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\n<think>\nI greet back.\n\
             </think>\n\nHello.<|im_end|><|im_start|>user\nSTOP here<|im_end|>\
             <|im_start|>assistant"
        );
    }

    #[test]
    fn bos_and_eos_around_the_prompt_are_the_tokenizers_to_add() {
        let source =
            "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}";
        let ends = |adds| SpecialEnds {
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
            adds_bos: adds,
            adds_eos: adds,
        };
        let cut = JinjaTemplate::new(source.into(), ends(true)).unwrap();
        let messages = [message("user", "text", "")];
        assert_eq!(cut.render(&messages, &[], false).unwrap(), "text");
        // A vocabulary that adds neither (ChatML's BOS is its <|im_start|>) keeps them.
        let kept = JinjaTemplate::new(source.into(), ends(false)).unwrap();
        assert_eq!(kept.render(&messages, &[], false).unwrap(), "<s>text</s>");
    }

    #[test]
    fn refusals_and_bad_templates_are_sentences() {
        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations start with a user') }}{% endif %}";
        let template = JinjaTemplate::new(source.into(), SpecialEnds::default()).unwrap();
        let refused = template
            .render(&[message("assistant", "x", "")], &[], true)
            .unwrap_err();
        assert!(
            refused.contains("Conversations start with a user"),
            "{refused}"
        );
        let broken = JinjaTemplate::new("{% for %}".into(), SpecialEnds::default());
        assert!(broken.is_err_and(|e| e.contains("does not compile")));
        let date =
            JinjaTemplate::new("{{ strftime_now('%Q') }}".into(), SpecialEnds::default()).unwrap();
        assert!(date.render(&[], &[], false).is_err());
    }

    #[test]
    fn a_system_message_the_template_refuses_joins_the_next_one() {
        // Gemma 2's habit: no system role.
        let source = "{% for m in messages %}{% if m.role == 'system' %}\
            {{ raise_exception('System role not supported') }}{% endif %}\
            [{{ m.role }}] {{ m.content }} {% endfor %}";
        let template = JinjaTemplate::new(source.into(), SpecialEnds::default()).unwrap();
        let messages = [
            message("system", "Be brief.", ""),
            message("user", "Hi", ""),
        ];
        assert_eq!(
            template.render(&messages, &[], true).unwrap(),
            "[user] Be brief.\nHi "
        );
    }

    #[test]
    fn generation_blocks_render_as_their_contents() {
        let source = "{% for m in messages %}{%- generation -%} {{ m.content }} \
            {%- endgeneration %}|{% endfor %}";
        let template = JinjaTemplate::new(source.into(), SpecialEnds::default()).unwrap();
        let messages = [message("user", "a", ""), message("assistant", "b", "")];
        assert_eq!(template.render(&messages, &[], false).unwrap(), "a|b|");
        // Text that only looks like a tag's start is left as it is.
        let odd = "{{ '{%}' }}{{ '{%' }}";
        assert_eq!(without_generation_blocks(odd), odd);
    }

    #[test]
    fn tojson_writes_what_pythons_json_dumps_writes() {
        let source =
            "{{ {'a': [1, 'x<y'], 'b': true} | tojson }}|{{ {'k': 1} | tojson(indent=2) }}";
        let template = JinjaTemplate::new(source.into(), SpecialEnds::default()).unwrap();
        assert_eq!(
            template.render(&[], &[], false).unwrap(),
            "{\"a\": [1, \"x<y\"], \"b\": true}|{\n  \"k\": 1\n}"
        );
    }
}
