//! Sources: one folder per database.

pub mod postgres;
