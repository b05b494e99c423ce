//! `--env-file FILE` (config key `env_file`): variables for the workers in the dotenv format
//! that Docker's `--env-file`, systemd's `EnvironmentFile=` and the dotenv libraries share:
//!
//! ```text
//! # a comment
//! VERSION=2
//! export DATABASE_URL="postgres://db/app"   # `export ` is allowed, and comments after a value
//! GREETING='single quotes: taken as written, $HOME too'
//! MOTD="double quotes: \n, \t, \" and \\ are escapes"
//! EMPTY=
//! ```
//!
//! A key is letters, digits and `_`, not starting with a digit. An unquoted value ends at the
//! end of the line or at ` #`, and its outer spaces are dropped. Nothing is expanded (`$HOME`
//! stays `$HOME`), and a quoted value ends on its line. Anything else is an error that names
//! the file and the line, so that a typo does not quietly start workers without a variable.

use std::path::Path;

/// Largest env file read (a few hundred variables are a few kilobytes).
const MAX_FILE: u64 = 1 << 20;

/// The variables of the file at `path`, in order, or one line: the file, the line, the
/// problem.
pub fn read(path: &Path) -> Result<Vec<(String, String)>, String> {
    let fail = |detail: String| format!("env file {}: {detail}", path.display());
    let size = std::fs::metadata(path)
        .map_err(|e| fail(format!("cannot read it: {e}")))?
        .len();
    if size > MAX_FILE {
        return Err(fail(format!(
            "{size} bytes, more than an env file of {MAX_FILE} bytes could need"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    parse(&text).map_err(|(line, problem)| fail(format!("line {line}: {problem}")))
}

/// The variables of `text`, or the first bad line's number (from 1) and its problem.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    let mut vars = Vec::new();
    for (at, line) in text.lines().enumerate() {
        let number = at + 1;
        if let Some(var) = parse_line(line).map_err(|problem| (number, problem))? {
            vars.push(var);
        }
    }
    Ok(vars)
}

/// One line: a variable, nothing (blank or a comment), or what is wrong with it.
fn parse_line(line: &str) -> Result<Option<(String, String)>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    if line.contains('\0') {
        return Err("a NUL byte, which no variable can hold".into());
    }
    let line = line
        .strip_prefix("export")
        .filter(|rest| rest.starts_with([' ', '\t']))
        .map_or(line, str::trim_start);
    let Some((key, value)) = line.split_once('=') else {
        return Err(format!(
            "`{}` is no KEY=value (a variable is set as NAME=value)",
            shorten(line)
        ));
    };
    let key = key.trim_end();
    let valid = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "`{}` is not a variable name (letters, digits and _, not starting with a digit)",
            shorten(key)
        ));
    }
    let value = value.trim_start();
    let (value, rest) = match value.chars().next() {
        Some(quote @ ('"' | '\'')) => quoted(&value[1..], quote)?,
        _ => {
            let end = value
                .find(" #")
                .or_else(|| value.find("\t#"))
                .unwrap_or(value.len());
            (value[..end].trim_end().to_string(), "")
        }
    };
    let rest = rest.trim_start();
    if !rest.is_empty() && !rest.starts_with('#') {
        return Err(format!(
            "`{}` after the closing quote of {key}'s value",
            shorten(rest)
        ));
    }
    Ok(Some((key.to_string(), value)))
}

/// A value after its opening `quote`: the value, and what follows its closing quote.
fn quoted(text: &str, quote: char) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        if c == quote {
            return Ok((value, &text[at + 1..]));
        }
        if c == '\\' && quote == '"' {
            match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, 't')) => value.push('\t'),
                Some((_, 'r')) => value.push('\r'),
                Some((_, other @ ('"' | '\\' | '$' | '`'))) => value.push(other),
                Some((_, other)) => {
                    value.push('\\');
                    value.push(other);
                }
                None => break,
            }
            continue;
        }
        value.push(c);
    }
    Err(format!(
        "the value's {quote} is not closed on its line (a value cannot span lines)"
    ))
}

/// At most 40 characters of `text`, for an error line.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(text: &str) -> Vec<(String, String)> {
        parse(text).unwrap_or_else(|(line, e)| panic!("line {line}: {e}"))
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_common_forms_are_read() {
        let text = "\
# a comment
VERSION=2

export DATABASE_URL=\"postgres://db/app\"   # the database
  SPACED = value with spaces   
GREETING='single: $HOME \\n # kept'
MOTD=\"a\\tb\\nc \\\"q\\\" \\\\ \\$x\"
EMPTY=
EMPTY_QUOTED=\"\"
URL=http://host/#anchor
TRAILING=plain # comment
exported=1
_UNDER=x
";
        assert_eq!(
            vars(text),
            pairs(&[
                ("VERSION", "2"),
                ("DATABASE_URL", "postgres://db/app"),
                ("SPACED", "value with spaces"),
                ("GREETING", "single: $HOME \\n # kept"),
                ("MOTD", "a\tb\nc \"q\" \\ $x"),
                ("EMPTY", ""),
                ("EMPTY_QUOTED", ""),
                ("URL", "http://host/#anchor"),
                ("TRAILING", "plain"),
                ("exported", "1"),
                ("_UNDER", "x"),
            ])
        );
    }

    #[test]
    fn a_later_line_follows_an_earlier_one_in_order() {
        // The caller applies them in order: the last one of a name wins.
        assert_eq!(vars("A=1\nA=2"), pairs(&[("A", "1"), ("A", "2")]));
    }

    #[test]
    fn export_is_a_prefix_only_before_a_space() {
        assert_eq!(vars("exportX=1"), pairs(&[("exportX", "1")]));
        assert_eq!(vars("export\tY=2"), pairs(&[("Y", "2")]));
    }

    #[test]
    fn bad_lines_are_named_by_number_and_problem() {
        let cases = [
            ("A=1\nnot a variable\n", 2, "is no KEY=value"),
            ("# c\n\n1ABC=x", 3, "is not a variable name"),
            ("A-B=x", 1, "is not a variable name"),
            ("=x", 1, "is not a variable name"),
            ("A=\"open", 1, "is not closed on its line"),
            ("A='open", 1, "' is not closed"),
            ("A=\"multi\nline\"", 1, "is not closed"),
            ("A=\"x\" y", 1, "after the closing quote of A's value"),
            ("A=x\0y", 1, "NUL"),
        ];
        for (text, line, expected) in cases {
            let Err((at, problem)) = parse(text) else {
                panic!("{text:?} was accepted");
            };
            assert_eq!(at, line, "{text:?}: {problem}");
            assert!(problem.contains(expected), "{text:?}: {problem}");
            assert!(!problem.contains('\n'), "{text:?}: {problem}");
        }
    }

    #[test]
    fn a_file_error_is_one_line_naming_the_file_and_line() {
        let dir = std::env::temp_dir().join(format!("clb-dotenv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.env");
        std::fs::write(&path, "VERSION=1\nBROKEN\n").unwrap();
        let error = read(&path).unwrap_err();
        assert_eq!(
            error,
            format!(
                "env file {}: line 2: `BROKEN` is no KEY=value (a variable is set as NAME=value)",
                path.display()
            )
        );
        std::fs::write(&path, "VERSION=1\n").unwrap();
        assert_eq!(read(&path).unwrap(), pairs(&[("VERSION", "1")]));
        let missing = dir.join("missing.env");
        let error = read(&missing).unwrap_err();
        assert!(
            error.starts_with(&format!("env file {}: cannot read it: ", missing.display())),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
