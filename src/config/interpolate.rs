//! `${NAME}` in string values, replaced from the environment. It runs on the parsed tree, so a
//! substituted value is never read as TOML, and it keeps the text as written so that messages
//! never show what came from the environment.

use super::check::Checker;
use super::document::{start, Node, Text, Val};

impl Checker<'_> {
    /// Substitutes every reference in the document; a reference that cannot be substituted is
    /// reported and marks its string unresolved.
    pub(super) fn interpolate(&mut self, root: &mut Val, env: &dyn Fn(&str) -> Option<String>) {
        self.interpolate_in(root, "", None, env);
    }

    /// `path` names `val` in messages (`source.url`); `fallback` is where to point when `val`
    /// has no span.
    fn interpolate_in(
        &mut self,
        val: &mut Val,
        path: &str,
        fallback: Option<usize>,
        env: &dyn Fn(&str) -> Option<String>,
    ) {
        let at = start(&val.span).or(fallback);
        match &mut val.node {
            Node::Str(text) => self.expand(text, path, at, env),
            Node::Array(items) => {
                for item in items {
                    self.interpolate_in(item, path, at, env);
                }
            }
            Node::Table(entries) => {
                for (key, value) in entries {
                    let path = if path.is_empty() {
                        key.name.clone()
                    } else {
                        format!("{path}.{}", key.name)
                    };
                    let at = start(&key.span).or(at);
                    self.interpolate_in(value, &path, at, env);
                }
            }
            Node::Int(_) | Node::Float(_) | Node::Bool(_) | Node::Datetime => {}
        }
    }

    fn expand(
        &mut self,
        text: &mut Text,
        path: &str,
        at: Option<usize>,
        env: &dyn Fn(&str) -> Option<String>,
    ) {
        if !text.value.contains("${") {
            return;
        }
        let raw = std::mem::take(&mut text.value);
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw.as_str();
        let mut ok = true;
        while let Some(i) = rest.find("${") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let Some(close) = after.find('}') else {
                self.report(
                    at,
                    format!("unterminated \"${{\" in {path}; write ${{NAME}} to use the environment variable NAME"),
                );
                ok = false;
                rest = "";
                break;
            };
            let name = &after[..close];
            if !is_env_name(name) {
                self.report(
                    at,
                    format!(
                        "invalid environment variable reference {:?} in {path}; a name is letters, digits and _, not starting with a digit",
                        format!("${{{name}}}")
                    ),
                );
                ok = false;
            } else {
                match env(name) {
                    Some(value) => out.push_str(&value),
                    None => {
                        self.report(
                            at,
                            format!("environment variable {name} is not set (used in {path})"),
                        );
                        ok = false;
                    }
                }
            }
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        text.value = out;
        text.raw = Some(raw);
        text.unresolved = !ok;
    }
}

fn is_env_name(s: &str) -> bool {
    s.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::config::testing::{errors, parse, HEAD, SECRET};
    use crate::config::SinkKind;

    #[test]
    fn missing_environment_variable_is_named_with_its_location() {
        let text = format!(
            "{}[[sink]]\nname = \"e\"\ntype = \"jsonl\"\npath = \"${{EVENTS_DIR}}/x\"\n",
            HEAD.replace("replicator@", "replicator:${SHOP_DB_PASSWORD}@")
        );
        assert_eq!(
            errors(&text),
            "tidemark.toml:6:7: environment variable SHOP_DB_PASSWORD is not set (used in source.url)\n\
             tidemark.toml:11:8: environment variable EVENTS_DIR is not set (used in sink.path)"
        );
    }

    #[test]
    fn malformed_references_are_reported() {
        let text = format!(
            "{}[[sink]]\nname = \"e\"\ntype = \"jsonl\"\npath = \"${{EVENTS\"\n",
            HEAD.replace("shop\"\n\n", "${1X}\"\n\n")
        );
        assert_eq!(
            errors(&text),
            "tidemark.toml:2:8: invalid environment variable reference \"${1X}\" in agent.name; a name is letters, digits and _, not starting with a digit\n\
             tidemark.toml:11:8: unterminated \"${\" in sink.path; write ${NAME} to use the environment variable NAME"
        );
    }

    #[test]
    fn interpolation_keeps_quotes_and_backslashes_of_the_value() {
        let text = format!(
            "{}[[sink]]\nname = \"m\"\ntype = \"postgres\"\nurl = \"postgres://loader:${{PW}}@h/w\"\nschema = \"${{SCHEMA}}\"\n\
             [[sink.table]]\nsource = [\"x\"]\ntarget = \"t\"\n",
            HEAD
        );
        // An array where a string belongs: interpolation walks into it, validation rejects it.
        assert_eq!(
            errors(&text),
            "tidemark.toml:14:10: \"source\" in [[sink.table]] #1 of [[sink]] \"m\" must be a string, found an array"
        );
        let text = text.replace("[\"x\"]", "\"public.orders\"");
        let config = parse(&text).unwrap();
        let SinkKind::Postgres(sink) = &config.sinks[0].kind else {
            panic!("expected a postgres sink, got {:?}", config.sinks[0]);
        };
        assert_eq!(sink.schema, "we\"ird\\name");
        assert_eq!(sink.url.expose(), "postgres://loader:pa\"ss\\w0rd@h/w");
        assert_eq!(sink.url.pg_config().get_password(), Some(SECRET.as_bytes()));
        assert_eq!(sink.tables[0].target, "we\"ird\\name.t");
    }

    #[test]
    fn messages_never_show_a_substituted_value() {
        let text = format!(
            "{HEAD}[[sink]]\nname = \"${{MODE}}\"\ntype = \"jsonl\"\npath = \"a\"\n\
             [[sink]]\nname = \"turbo\"\ntype = \"jsonl\"\npath = \"b\"\nbatch_max_wait = \"${{PW}}\"\n\
             [[sink]]\nname = \"m\"\ntype = \"postgres\"\nurl = \"postgres://l@h/w\"\nschema = \"${{PW}}\"\n\
             [[sink.table]]\nsource = \"${{MODE}}\"\ntarget = \"t\"\n"
        );
        let message = errors(&text);
        assert_eq!(
            message,
            [
                r#"tidemark.toml:13:8: duplicate sink name "turbo" (first used on line 9); sink names must be unique"#,
                r#"tidemark.toml:16:18: "batch_max_wait" in [[sink]] "turbo" must be a duration such as "500ms", "30s", "1.5s" or "2m" (units ms, s, m, h); found "${PW}" (expanded value not shown)"#,
                r#"tidemark.toml:23:10: "source" in [[sink.table]] #1 of [[sink]] "m": table "${MODE}" (expanded value not shown) is not captured by source.tables"#,
            ]
            .join("\n")
        );
        assert!(!message.contains("w0rd"));
    }
}
