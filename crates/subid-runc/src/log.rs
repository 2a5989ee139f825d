//! Messages where the caller shows them: the runtime's `--log` file, in its `--log-format`
//! (`json`: one `{"level","msg","time"}` object per line, as runc writes it; containerd reads
//! the last error line and Docker prints it), and stderr for errors.

use std::io::Write;
use std::path::PathBuf;
use std::time::SystemTime;

/// Writes the wrapper's messages.
#[derive(Debug, Clone, Default)]
pub struct Reporter {
    log: Option<PathBuf>,
    json: bool,
}

impl Reporter {
    /// `log`: the runtime's `--log`; `format`: its `--log-format` (`json` or text).
    pub fn new(log: Option<PathBuf>, format: Option<&str>) -> Reporter {
        Reporter {
            log,
            json: format == Some("json"),
        }
    }

    /// An error: to the log file and to stderr.
    pub fn error(&self, message: &str) {
        let message = format!("subid-runc: {message}");
        self.write("error", &message);
        eprintln!("{message}");
    }

    /// A warning: to the log file only (stderr of `create` is the container's), or to stderr
    /// when there is no log file.
    pub fn warn(&self, message: &str) {
        let message = format!("subid-runc: {message}");
        if self.log.is_some() {
            self.write("warning", &message);
        } else {
            eprintln!("{message}");
        }
    }

    /// The line as it goes into the log file.
    pub fn line(&self, level: &str, message: &str) -> String {
        let time = humantime::format_rfc3339_nanos(SystemTime::now()).to_string();
        if self.json {
            let mut line =
                serde_json::json!({ "level": level, "msg": message, "time": time }).to_string();
            line.push('\n');
            line
        } else {
            // logrus's text format, the message quoted.
            let quoted = serde_json::Value::String(message.to_string()).to_string();
            format!("time=\"{time}\" level={level} msg={quoted}\n")
        }
    }

    fn write(&self, level: &str, message: &str) {
        let Some(path) = &self.log else {
            return;
        };
        let line = self.line(level, message);
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("subid-runc: cannot write to {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_what_containerd_reads() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.json");
        let r = Reporter::new(Some(log.clone()), Some("json"));
        r.warn("first");
        r.error("pool \"exhausted\"");
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["level"], "warning");
        assert_eq!(lines[1]["level"], "error");
        assert_eq!(lines[1]["msg"], "subid-runc: pool \"exhausted\"");
        assert!(lines[1]["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn text_lines_quote_the_message() {
        let r = Reporter::new(None, None);
        let line = r.line("error", "a \"b\"");
        assert!(line.contains("level=error msg=\"a \\\"b\\\"\""), "{line}");
    }
}
