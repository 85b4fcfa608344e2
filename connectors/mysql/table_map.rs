//! The columns of a table as the binlog describes them when it was written: a table map
//! event with `binlog_row_metadata = FULL` names each column and carries its type, its
//! signedness, its character set and its ENUM/SET labels. The stream reads the catalog
//! later, when a DDL statement further on may have added, dropped or changed columns;
//! each column of a row image is taken from the catalog only when the catalog agrees with
//! the table map on what it is.

use mysql_async::binlog::events::{OptionalMetadataField, TableMapEvent};
use mysql_async::consts::ColumnType;

use super::catalog::CatalogColumn;

/// MySQL's `binary` character set: the column holds bytes, not text.
const BINARY_CHARSET: u64 = 63;

/// The table map's description of its columns, `None` unless it names every one of them.
pub fn columns(table_map: &TableMapEvent<'_>) -> Option<Vec<CatalogColumn>> {
    let count = usize::try_from(table_map.columns_count()).ok()?;
    let mut metadata = Metadata::default();
    for field in table_map.iter_optional_meta() {
        metadata.read(field.ok()?)?;
    }
    if metadata.names.len() != count {
        return None;
    }
    let (mut numeric, mut character, mut enums, mut sets) = (0, 0, 0, 0);
    let mut columns = Vec::with_capacity(count);
    for (index, name) in metadata.names.iter().enumerate() {
        let column_type = table_map.get_column_type(index).ok()??;
        let meta = table_map.get_column_metadata(index).unwrap_or_default();
        let unsigned = column_type.is_numeric_type() && {
            numeric += 1;
            metadata.unsigned.get(numeric - 1).copied().unwrap_or(false)
        };
        let binary = column_type.is_character_type() && {
            character += 1;
            metadata.charset(character - 1) == Some(BINARY_CHARSET)
        };
        let labels = if column_type.is_enum_type() {
            enums += 1;
            metadata.enum_labels.get(enums - 1)
        } else if column_type.is_set_type() {
            sets += 1;
            metadata.set_labels.get(sets - 1)
        } else {
            None
        };
        let mut column = described(column_type, meta, binary, name.clone());
        if unsigned {
            column.column_type.push_str(" unsigned");
        }
        if let Some(labels) = labels {
            let quoted: Vec<String> = labels
                .iter()
                .map(|l| format!("'{}'", l.replace('\'', "''")))
                .collect();
            column.column_type = format!("{}({})", column.data_type, quoted.join(","));
        }
        column.primary_key = metadata.primary_key.contains(&index);
        columns.push(column);
    }
    Some(columns)
}

/// Whether the catalog's `column` is what the table map describes as `mapped`: the same
/// name and type, signedness and labels (so that its values decode alike).
pub fn agrees(column: &CatalogColumn, mapped: &CatalogColumn) -> bool {
    fn comparable(data_type: &str) -> &str {
        match data_type {
            "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" => "text",
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => "bytes",
            // MariaDB's JSON is LONGTEXT with a check.
            "json" => "text",
            other => other,
        }
    }
    column.name == mapped.name
        && comparable(&column.data_type) == comparable(&mapped.data_type)
        && column.column_type.contains("unsigned") == mapped.column_type.contains("unsigned")
        && (!matches!(mapped.data_type.as_str(), "enum" | "set")
            || column.column_type == mapped.column_type)
}

#[derive(Default)]
struct Metadata {
    names: Vec<String>,
    /// One flag per numeric column, in column order.
    unsigned: Vec<bool>,
    default_charset: Option<u64>,
    /// (index among the character columns, charset) where not the default.
    other_charsets: Vec<(u64, u64)>,
    /// One charset per character column, when the table has no default.
    column_charsets: Vec<u64>,
    enum_labels: Vec<Vec<String>>,
    set_labels: Vec<Vec<String>>,
    primary_key: Vec<usize>,
}

impl Metadata {
    fn read(&mut self, field: OptionalMetadataField<'_>) -> Option<()> {
        match field {
            OptionalMetadataField::ColumnName(names) => {
                for name in names.iter_names() {
                    self.names.push(name.ok()?.name().into_owned());
                }
            }
            OptionalMetadataField::Signedness(flags) => {
                self.unsigned = flags.iter().map(|flag| *flag).collect();
            }
            OptionalMetadataField::DefaultCharset(charsets) => {
                self.default_charset = Some(u64::from(charsets.default_charset()));
                for other in charsets.iter_non_default() {
                    let other = other.ok()?;
                    self.other_charsets
                        .push((other.column_index(), u64::from(other.charset())));
                }
            }
            OptionalMetadataField::ColumnCharset(charsets) => {
                for charset in charsets.iter_charsets() {
                    self.column_charsets.push(u64::from(charset.ok()?));
                }
            }
            OptionalMetadataField::EnumStrValue(values) => {
                for labels in values.iter_values() {
                    let labels = labels.ok()?;
                    self.enum_labels.push(
                        labels
                            .values()
                            .iter()
                            .map(|v| v.value().into_owned())
                            .collect(),
                    );
                }
            }
            OptionalMetadataField::SetStrValue(values) => {
                for labels in values.iter_values() {
                    let labels = labels.ok()?;
                    self.set_labels.push(
                        labels
                            .values()
                            .iter()
                            .map(|v| v.value().into_owned())
                            .collect(),
                    );
                }
            }
            OptionalMetadataField::SimplePrimaryKey(key) => {
                for index in key.iter_indexes() {
                    self.primary_key.push(usize::try_from(index.ok()?).ok()?);
                }
            }
            OptionalMetadataField::PrimaryKeyWithPrefix(key) => {
                for part in key.iter_keys() {
                    self.primary_key
                        .push(usize::try_from(part.ok()?.column_index()).ok()?);
                }
            }
            _ => {}
        }
        Some(())
    }

    /// The charset of the `index`th character column.
    fn charset(&self, index: usize) -> Option<u64> {
        if let Some(charset) = self.column_charsets.get(index) {
            return Some(*charset);
        }
        let position = u64::try_from(index).ok()?;
        self.other_charsets
            .iter()
            .find(|(column, _)| *column == position)
            .map(|(_, charset)| *charset)
            .or(self.default_charset)
    }
}

/// A column as its binlog type and type metadata describe it, in the catalog's terms.
fn described(column_type: ColumnType, meta: &[u8], binary: bool, name: String) -> CatalogColumn {
    use ColumnType::*;
    let byte = |i: usize| meta.get(i).copied().map(u64::from);
    let (data_type, precision, scale, fsp) = match column_type {
        MYSQL_TYPE_TINY => ("tinyint", None, None, None),
        MYSQL_TYPE_SHORT => ("smallint", None, None, None),
        MYSQL_TYPE_INT24 => ("mediumint", None, None, None),
        MYSQL_TYPE_LONG => ("int", None, None, None),
        MYSQL_TYPE_LONGLONG => ("bigint", None, None, None),
        MYSQL_TYPE_FLOAT => ("float", None, None, None),
        MYSQL_TYPE_DOUBLE => ("double", None, None, None),
        MYSQL_TYPE_DECIMAL | MYSQL_TYPE_NEWDECIMAL => ("decimal", byte(0), byte(1), None),
        // Its metadata: the bits of the last byte, then the whole bytes.
        MYSQL_TYPE_BIT => (
            "bit",
            Some(byte(1).unwrap_or(0) * 8 + byte(0).unwrap_or(0)),
            None,
            None,
        ),
        MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE => ("date", None, None, None),
        MYSQL_TYPE_TIME => ("time", None, None, Some(0)),
        MYSQL_TYPE_TIME2 => ("time", None, None, byte(0)),
        MYSQL_TYPE_DATETIME => ("datetime", None, None, Some(0)),
        MYSQL_TYPE_DATETIME2 => ("datetime", None, None, byte(0)),
        MYSQL_TYPE_TIMESTAMP => ("timestamp", None, None, Some(0)),
        MYSQL_TYPE_TIMESTAMP2 => ("timestamp", None, None, byte(0)),
        MYSQL_TYPE_YEAR => ("year", None, None, None),
        MYSQL_TYPE_VARCHAR | MYSQL_TYPE_VAR_STRING if binary => ("varbinary", None, None, None),
        MYSQL_TYPE_VARCHAR | MYSQL_TYPE_VAR_STRING => ("varchar", None, None, None),
        MYSQL_TYPE_STRING if binary => ("binary", None, None, None),
        MYSQL_TYPE_STRING => ("char", None, None, None),
        MYSQL_TYPE_ENUM => ("enum", None, None, None),
        MYSQL_TYPE_SET => ("set", None, None, None),
        MYSQL_TYPE_TINY_BLOB | MYSQL_TYPE_MEDIUM_BLOB | MYSQL_TYPE_LONG_BLOB | MYSQL_TYPE_BLOB
            if binary =>
        {
            ("blob", None, None, None)
        }
        MYSQL_TYPE_TINY_BLOB | MYSQL_TYPE_MEDIUM_BLOB | MYSQL_TYPE_LONG_BLOB | MYSQL_TYPE_BLOB => {
            ("text", None, None, None)
        }
        MYSQL_TYPE_JSON => ("json", None, None, None),
        MYSQL_TYPE_GEOMETRY => ("geometry", None, None, None),
        _ => ("text", None, None, None),
    };
    CatalogColumn {
        name,
        data_type: data_type.to_owned(),
        column_type: data_type.to_owned(),
        primary_key: false,
        char_length: None,
        precision,
        scale,
        datetime_precision: fsp,
        default: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, data_type: &str, column_type: &str) -> CatalogColumn {
        let mut column = described(ColumnType::MYSQL_TYPE_LONG, &[], false, name.to_owned());
        column.data_type = data_type.to_owned();
        column.column_type = column_type.to_owned();
        column
    }

    #[test]
    fn the_catalog_agrees_where_values_decode_alike() {
        let mapped = column("name", "varchar", "varchar");
        assert!(agrees(&column("name", "varchar", "varchar(40)"), &mapped));
        // MariaDB's JSON is text in the table map.
        assert!(agrees(
            &column("name", "json", "json"),
            &column("name", "text", "text")
        ));
        assert!(!agrees(&column("title", "varchar", "varchar(40)"), &mapped));
        assert!(!agrees(
            &column("name", "varbinary", "varbinary(4)"),
            &mapped
        ));

        let unsigned = column("qty", "int", "int unsigned");
        assert!(agrees(&column("qty", "int", "int(10) unsigned"), &unsigned));
        assert!(!agrees(&column("qty", "int", "int(11)"), &unsigned));

        let labels = column("grade", "enum", "enum('low','high')");
        assert!(agrees(
            &column("grade", "enum", "enum('low','high')"),
            &labels
        ));
        assert!(!agrees(
            &column("grade", "enum", "enum('low','mid','high')"),
            &labels
        ));
    }

    #[test]
    fn binlog_types_and_metadata_describe_columns() {
        let decimal = described(
            ColumnType::MYSQL_TYPE_NEWDECIMAL,
            &[12, 3],
            false,
            "p".into(),
        );
        assert_eq!(
            (decimal.data_type.as_str(), decimal.precision, decimal.scale),
            ("decimal", Some(12), Some(3))
        );
        let bits = described(ColumnType::MYSQL_TYPE_BIT, &[3, 1], false, "b".into());
        assert_eq!(bits.precision, Some(11));
        let time = described(ColumnType::MYSQL_TYPE_TIME2, &[4], false, "t".into());
        assert_eq!(time.datetime_precision, Some(4));
        let bytes = described(ColumnType::MYSQL_TYPE_VARCHAR, &[4, 0], true, "v".into());
        assert_eq!(bytes.data_type, "varbinary");
        let text = described(ColumnType::MYSQL_TYPE_BLOB, &[2], false, "x".into());
        assert_eq!(text.data_type, "text");
    }
}
