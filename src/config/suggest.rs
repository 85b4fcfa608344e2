//! "Did you mean": the valid key an unknown one was probably meant to be.

/// Names people bring from other tools (Debezium, Kafka clients) that no string distance
/// would map to ours.
const KEY_ALIASES: &[(&str, &str)] = &[
    ("batchsize", "batch_max_rows"),
    ("batch_size", "batch_max_rows"),
    ("batch_rows", "batch_max_rows"),
    ("max_batch_size", "batch_max_rows"),
    ("max_batch_rows", "batch_max_rows"),
    ("batch_timeout", "batch_max_wait"),
    ("batch_wait", "batch_max_wait"),
    ("max_batch_wait", "batch_max_wait"),
    ("linger", "batch_max_wait"),
    ("flush_interval", "batch_max_wait"),
    ("slot_name", "slot"),
    ("publication_name", "publication"),
    ("snapshot_mode", "snapshot"),
    ("table_include_list", "tables"),
    ("dsn", "url"),
    ("uri", "url"),
    ("connection_string", "url"),
    ("dir", "path"),
    ("directory", "path"),
    ("kind", "type"),
];

/// The valid key nearest to an unknown one, if any is near enough.
pub(super) fn suggest<'k>(key: &str, allowed: &[&'k str]) -> Option<&'k str> {
    let norm = key.to_ascii_lowercase().replace('-', "_");
    if let Some(same) = allowed.iter().find(|a| **a == norm) {
        return Some(same);
    }
    if let Some((_, to)) = KEY_ALIASES.iter().find(|(from, _)| *from == norm) {
        if let Some(a) = allowed.iter().find(|a| *a == to) {
            return Some(a);
        }
    }
    allowed
        .iter()
        .map(|a| (strsim::jaro_winkler(&norm, a), *a))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|x, y| x.0.total_cmp(&y.0))
        .map(|(_, a)| a)
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{errors, HEAD, JSONL_SINK};

    #[test]
    fn unknown_key_names_file_line_column_table_and_nearest_key() {
        let text = r#"[agent]
name = "shop"

[source]
type = "postgres"
url = "postgres://replicator@127.0.0.1:5432/shop"
tables = ["public.orders"]

[[sink]]
name = "mirror"
type = "postgres"
url = "postgres://loader@127.0.0.1:5432/warehouse"
schema = "replica"
  batchsize = 500
"#;
        assert_eq!(
            errors(text),
            r#"tidemark.toml:14:3: unknown key "batchsize" in [[sink]] "mirror"; did you mean "batch_max_rows"?"#
        );
        let text = text.replace("batchsize", "batch_max_row");
        assert_eq!(
            errors(&text),
            r#"tidemark.toml:14:3: unknown key "batch_max_row" in [[sink]] "mirror"; did you mean "batch_max_rows"?"#
        );
    }

    #[test]
    fn unknown_key_far_from_any_lists_the_valid_keys() {
        let text = HEAD.replace("name = \"shop\"", "name = \"shop\"\ncolour = 3");
        let text = format!("{text}{JSONL_SINK}sinks = 2\n");
        assert_eq!(
            errors(&text),
            "tidemark.toml:3:1: unknown key \"colour\" in [agent]; valid keys are \"name\", \"data_dir\", \"health_addr\", \"ready_max_lag\", \"log_max_bytes\"\n\
             tidemark.toml:13:1: unknown key \"sinks\" in [[sink]] \"e\"; valid keys are \"name\", \"type\", \"batch_max_rows\", \"batch_max_wait\", \"path\", \"max_file_bytes\""
        );
        let text = format!("{HEAD}sinks = []\n{JSONL_SINK}");
        assert_eq!(
            errors(&text),
            "tidemark.toml:8:1: unknown key \"sinks\" in [source]; valid keys are \"type\", \"url\", \"tables\", \"slot\", \"publication\", \"snapshot\", \"connect_timeout\", \"status_interval\", \"snapshot_parallelism\", \"heartbeat_interval\", \"heartbeat_query\", \"slot_max_retained_bytes\""
        );
    }

    #[test]
    fn unknown_top_level_key_suggests_the_table() {
        let text = format!("sinks = 1\n{HEAD}{JSONL_SINK}");
        assert_eq!(
            errors(&text),
            r#"tidemark.toml:1:1: unknown key "sinks" in the top-level table; did you mean "sink"?"#
        );
    }
}
