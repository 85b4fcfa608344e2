//! What the PostgreSQL source and the PostgreSQL sinks share as clients of a server, beside
//! the text codec (`pgtext`) and TLS (`tls`): how a server's error is reported.

/// The server's message and SQLSTATE for a database error (what an operator searches for),
/// else the error's own text.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}
