//! The `options` startup parameter, read as PostgreSQL reads it: split into words
//! (`pg_split_opts` in postinit.c: blanks separate, a backslash makes the next
//! character literal), then walked as the server's command line with glibc's `getopt`
//! (`process_postgres_switches` in postgres.c, with the `PGC_BACKEND` context of a
//! client's switches). `-c name=value` and `--name=value` set a parameter (dashes in
//! the name become underscores: `ParseLongOption` in guc.c); the other switches set
//! the parameter they stand for (`-e` is `datestyle=euro`, `-B` is `shared_buffers`);
//! switches only the postmaster honours are ignored, as the server ignores them for a
//! client. What Postgres refuses here comes back as the same error ([`OptionsError`]);
//! whether a parameter may be set, and to that value, only a server can say.
//!
//! Pure and linear in the length of the value (at most the startup packet's 10,000
//! bytes): one pass to split, one over the words.

/// One parameter the options set, in the order the server would set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub name: String,
    pub value: String,
}

/// A fault the server reports while reading the options (42601 syntax_error, FATAL at
/// startup), with its own message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// `-c name` or `--name` without `=value`.
    #[error("{}{arg} requires a value", if *.long { "--" } else { "-c " })]
    RequiresValue { long: bool, arg: String },
    /// A switch the server does not know or whose argument it cannot read, a switch
    /// missing its argument, or a word that is no switch. The word is the one the
    /// server names, which glibc's `getopt` makes `postgres` in one odd case (an
    /// unknown switch first in a group: `-Xe`).
    #[error("invalid command-line argument for server process: {0}")]
    InvalidArgument(String),
}

impl OptionsError {
    /// The hint the server adds, if any.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            OptionsError::InvalidArgument(_) => {
                Some("Try \"postgres --help\" for more information.")
            }
            OptionsError::RequiresValue { .. } => None,
        }
    }
}

/// What the options amount to: the settings, in order, up to the first fault, and
/// that fault. The server applies each setting as it reads it, so one that fails
/// before the fault is what the client is told.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Options {
    pub settings: Vec<Setting>,
    pub error: Option<OptionsError>,
}

/// The switches of a server process and whether each takes an argument
/// (`process_postgres_switches`' getopt string).
const SWITCHES: &str = "B:bc:C:D:d:EeFf:h:ijk:lN:nOPp:r:S:sTt:v:W:-:";

/// The program name the server's argument vector starts with.
const ARGV0: &str = "postgres";

/// Reads an `options` value.
pub fn parse(options: &str) -> Options {
    let mut argv = vec![ARGV0.to_owned()];
    argv.extend(split(options));
    let mut getopt = Getopt::new(argv);
    let mut out = Options::default();
    let mut set = |name: &str, value: &str| {
        out.settings.push(Setting {
            name: name.to_owned(),
            value: value.to_owned(),
        })
    };
    let mut failed = false;
    loop {
        let (flag, arg) = match getopt.step() {
            Step::Switch(flag, arg) => (flag, arg),
            Step::Fault => {
                failed = true;
                break;
            }
            Step::End => break,
        };
        let arg = arg.as_deref().unwrap_or_default();
        match flag {
            'B' => set("shared_buffers", arg),
            'd' => debug_options(atoi(arg), &mut set),
            'e' => set("datestyle", "euro"),
            'F' => set("fsync", "false"),
            'f' => match plan_switch(arg) {
                Some(name) => set(name, "false"),
                None => failed = true,
            },
            'h' => set("listen_addresses", arg),
            'i' => set("listen_addresses", "*"),
            'k' => set("unix_socket_directories", arg),
            'l' => set("ssl", "true"),
            'N' => set("max_connections", arg),
            'O' => set("allow_system_table_mods", "true"),
            'P' => set("ignore_system_indexes", "true"),
            'p' => set("port", arg),
            'S' => set("work_mem", arg),
            's' => set("log_statement_stats", "true"),
            't' => match stats_switch(arg) {
                Some(name) => set(name, "true"),
                None => failed = true,
            },
            'W' => set("post_auth_delay", arg),
            'c' | '-' => match arg.split_once('=') {
                Some((name, value)) => set(&name.replace('-', "_"), value),
                None => {
                    out.error = Some(OptionsError::RequiresValue {
                        long: flag == '-',
                        arg: arg.to_owned(),
                    });
                    return out;
                }
            },
            // Honoured only on the server's own command line ("secure"), or ignored
            // by the server for consistency with the postmaster.
            'b' | 'C' | 'D' | 'E' | 'j' | 'n' | 'r' | 'T' | 'v' => {}
            _ => failed = true,
        }
        if failed {
            break;
        }
    }
    let word = if failed {
        Some(getopt.faulty_word())
    } else {
        getopt.leftover_word()
    };
    if let Some(word) = word {
        out.error = Some(OptionsError::InvalidArgument(word.to_owned()));
    }
    out
}

/// `pg_split_opts`: words separated by blanks (C `isspace`), a backslash taking the
/// next character literally (a trailing one is dropped).
fn split(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut escaped = false;
    for c in options.chars() {
        if !escaped && is_c_space(c) {
            if in_word {
                words.push(std::mem::take(&mut word));
                in_word = false;
            }
            continue;
        }
        in_word = true;
        if !escaped && c == '\\' {
            escaped = true;
        } else {
            escaped = false;
            word.push(c);
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{b}' | '\u{c}' | '\r')
}

/// C's `atoi` on the well-defined part: blanks, a sign, digits (saturating).
fn atoi(s: &str) -> i64 {
    let s = s.trim_start_matches(is_c_space);
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let mut n: i64 = 0;
    for d in digits.chars().map_while(|c| c.to_digit(10)) {
        n = n.saturating_mul(10).saturating_add(i64::from(d));
    }
    if negative { -n } else { n }
}

/// `set_debug_options` for a client (`-d level`).
fn debug_options(level: i64, set: &mut impl FnMut(&str, &str)) {
    if level > 0 {
        set("log_min_messages", &format!("debug{level}"));
    } else {
        set("log_min_messages", "notice");
    }
    for (from, name) in [
        (2, "log_statement"),
        (3, "debug_print_parse"),
        (4, "debug_print_plan"),
        (5, "debug_print_rewritten"),
    ] {
        if level >= from {
            set(name, if from == 2 { "all" } else { "true" });
        }
    }
}

/// `set_plan_disabling_options` (`-f s`, …).
fn plan_switch(arg: &str) -> Option<&'static str> {
    Some(match arg.chars().next()? {
        's' => "enable_seqscan",
        'i' => "enable_indexscan",
        'o' => "enable_indexonlyscan",
        'b' => "enable_bitmapscan",
        't' => "enable_tidscan",
        'n' => "enable_nestloop",
        'm' => "enable_mergejoin",
        'h' => "enable_hashjoin",
        _ => return None,
    })
}

/// `get_stats_option_name` (`-t pa`, `-t pl`, `-t e`).
fn stats_switch(arg: &str) -> Option<&'static str> {
    let mut chars = arg.chars();
    match (chars.next()?, chars.next()) {
        ('p', Some('a')) => Some("log_parser_stats"),
        ('p', Some('l')) => Some("log_planner_stats"),
        ('e', _) => Some("log_executor_stats"),
        _ => None,
    }
}

/// glibc's `getopt` in its default (permuting) order without long options: words that
/// are no switch are skipped (getopt moves them after the switches), `--` ends the
/// switches, and a switch that takes an argument takes the rest of its word or the
/// next word.
///
/// getopt permutes its argument vector in place; what the server then reports is one
/// word of that vector, so only the few positions that can be reported are kept, not
/// the vector: every word is looked at once.
struct Getopt {
    words: Vec<String>,
    /// The next word not yet read.
    next: usize,
    /// The word being read as a group of switches, and where in it.
    group: Option<(usize, usize)>,
    /// The last switch word (or argument) getopt has put in place, `postgres` first.
    done_last: usize,
    /// Words read since the last reordering: they join the done ones at the next word.
    since_last: Option<usize>,
    /// The words that are no switch, first and last so far.
    skipped: Option<(usize, usize)>,
}

/// What `next` found.
enum Step {
    Switch(char, Option<String>),
    /// getopt's `?`: an unknown switch, or one missing its argument.
    Fault,
    End,
}

impl Getopt {
    fn new(words: Vec<String>) -> Self {
        Getopt {
            words,
            next: 1,
            group: None,
            done_last: 0,
            since_last: None,
            skipped: None,
        }
    }

    fn is_switch(&self, i: usize) -> bool {
        let word = self.words[i].as_bytes();
        word.first() == Some(&b'-') && word.len() > 1
    }

    fn skip(&mut self, i: usize) {
        self.skipped = Some(match self.skipped {
            Some((first, _)) => (first, i),
            None => (i, i),
        });
    }

    /// The word the server names when a walk ends with a fault: the one before where
    /// getopt stopped.
    fn faulty_word(&self) -> &str {
        let at = match (self.group, self.since_last) {
            // Stopped inside a group: the word before it, in getopt's order.
            (Some(_), _) => self.skipped.map_or(self.done_last, |(_, last)| last),
            (None, Some(last)) => last,
            (None, None) => self.done_last,
        };
        &self.words[at]
    }

    /// The word the server names when the walk ends cleanly: the first that is no
    /// switch, if any.
    fn leftover_word(&self) -> Option<&str> {
        self.skipped.map(|(first, _)| self.words[first].as_str())
    }

    fn step(&mut self) -> Step {
        let (word, at) = match self.group {
            Some(place) => place,
            None => {
                // A new word: what was read since the last one is in place now.
                if let Some(last) = self.since_last.take() {
                    self.done_last = last;
                }
                while self.next < self.words.len() && !self.is_switch(self.next) {
                    self.skip(self.next);
                    self.next += 1;
                }
                if self.next == self.words.len() {
                    return Step::End;
                }
                if self.words[self.next] == "--" {
                    self.done_last = self.next;
                    for i in self.next + 1..self.words.len() {
                        self.skip(i);
                    }
                    self.next = self.words.len();
                    return Step::End;
                }
                self.next += 1;
                (self.next - 1, 1)
            }
        };
        let text = &self.words[word];
        let Some(c) = text[at..].chars().next() else {
            return Step::End;
        };
        let after = at + c.len_utf8();
        // Copied only where it is the argument: a word of n switches is read in O(n).
        let rest_empty = after == text.len();
        if rest_empty {
            self.group = None;
            self.since_last = Some(word);
        } else {
            self.group = Some((word, after));
        }
        let Some(pos) = SWITCHES.find(c).filter(|_| c != ':') else {
            return Step::Fault;
        };
        if !SWITCHES[pos + c.len_utf8()..].starts_with(':') {
            return Step::Switch(c, None);
        }
        // Takes an argument: the rest of the word, or the next word.
        self.group = None;
        self.since_last = Some(word);
        if !rest_empty {
            return Step::Switch(c, Some(self.words[word][after..].to_owned()));
        }
        if self.next == self.words.len() {
            return Step::Fault;
        }
        self.next += 1;
        self.since_last = Some(self.next - 1);
        Step::Switch(c, Some(self.words[self.next - 1].clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(options: &str) -> Vec<(String, String)> {
        let parsed = parse(options);
        assert_eq!(parsed.error, None, "{options:?}");
        parsed
            .settings
            .into_iter()
            .map(|s| (s.name, s.value))
            .collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    fn invalid(options: &str) -> String {
        match parse(options).error {
            Some(OptionsError::InvalidArgument(word)) => word,
            other => panic!("{options:?}: {other:?}"),
        }
    }

    #[test]
    fn dash_c_and_double_dash_set_parameters() {
        assert_eq!(
            settings("-c default_transaction_read_only=on"),
            pairs(&[("default_transaction_read_only", "on")])
        );
        assert_eq!(
            settings("-cstatement_timeout=5s --lock-timeout=1s"),
            pairs(&[("statement_timeout", "5s"), ("lock_timeout", "1s")])
        );
        // Only the name's dashes become underscores; the value keeps its `=`s.
        assert_eq!(
            settings("--app.my-key=a=b-c"),
            pairs(&[("app.my_key", "a=b-c")])
        );
        assert_eq!(settings(""), pairs(&[]));
        assert_eq!(settings("   \t "), pairs(&[]));
        assert_eq!(settings("--"), pairs(&[]));
    }

    #[test]
    fn backslashes_escape_blanks_and_themselves() {
        assert_eq!(
            settings(r"-c search_path=a,\ b -c application_name=x\\y"),
            pairs(&[("search_path", "a, b"), ("application_name", r"x\y")])
        );
        // A trailing backslash is dropped; an escaped letter is the letter.
        assert_eq!(settings(r"-c a.b=x\"), pairs(&[("a.b", "x")]));
        assert_eq!(settings(r"-c a.b=\x"), pairs(&[("a.b", "x")]));
        // Any C blank separates words.
        assert_eq!(
            settings("-c\ta.b=1\n-c\ra.c=2"),
            pairs(&[("a.b", "1"), ("a.c", "2")])
        );
    }

    #[test]
    fn other_switches_stand_for_their_parameters() {
        assert_eq!(
            settings("-e -F -B 8MB -S64MB -fs -tpa -i"),
            pairs(&[
                ("datestyle", "euro"),
                ("fsync", "false"),
                ("shared_buffers", "8MB"),
                ("work_mem", "64MB"),
                ("enable_seqscan", "false"),
                ("log_parser_stats", "true"),
                ("listen_addresses", "*"),
            ])
        );
        // Grouped switches, one taking the rest of the word.
        assert_eq!(
            settings("-eSx"),
            pairs(&[("datestyle", "euro"), ("work_mem", "x")])
        );
        assert_eq!(
            settings("-d 3"),
            pairs(&[
                ("log_min_messages", "debug3"),
                ("log_statement", "all"),
                ("debug_print_parse", "true"),
            ])
        );
        assert_eq!(settings("-d x"), pairs(&[("log_min_messages", "notice")]));
        // Honoured only on the server's own command line: ignored, no error.
        assert_eq!(settings("-b -E -j -n -T -C x -D /x -r f -v 3"), pairs(&[]));
    }

    #[test]
    fn a_setting_without_a_value_is_refused_as_postgres_refuses_it() {
        let parsed = parse("-c a.b=1 -c statement_timeout -c a.c=2");
        assert_eq!(
            parsed.settings,
            vec![Setting {
                name: "a.b".into(),
                value: "1".into()
            }]
        );
        let error = parsed.error.unwrap();
        assert_eq!(error.to_string(), "-c statement_timeout requires a value");
        assert_eq!(error.hint(), None);
        let error = parse("--lock-timeout").error.unwrap();
        assert_eq!(error.to_string(), "--lock-timeout requires a value");
        // The next word is the argument, even when it looks like a switch.
        let error = parse("-c -e").error.unwrap();
        assert_eq!(error.to_string(), "-c -e requires a value");
    }

    /// The word each fault names, as PostgreSQL 15 on glibc names it (checked against
    /// a real server: `PGOPTIONS=… psql`).
    #[test]
    fn faults_name_the_word_the_server_names() {
        assert_eq!(invalid("-X"), "-X");
        assert_eq!(invalid("-eX"), "-eX");
        assert_eq!(invalid("-Xe"), "postgres");
        assert_eq!(invalid("-c"), "-c");
        assert_eq!(invalid("foo"), "foo");
        assert_eq!(invalid("-"), "-");
        assert_eq!(invalid("-fz"), "-fz");
        assert_eq!(invalid("-f z"), "z");
        assert_eq!(invalid("-t x"), "x");
        assert_eq!(invalid("-- foo"), "foo");
        assert_eq!(invalid("-c a.b=1 -- -c x"), "-c");
        assert_eq!(invalid("foo -Xe"), "foo");
        assert_eq!(invalid("-tp"), "-tp");
        assert_eq!(invalid("-e-"), "-e-");
        assert_eq!(invalid("x -e y -X"), "-X");
        // Words that are no switch are moved after the switches, which still apply.
        let parsed = parse("foo -c a.b=1 bar");
        assert_eq!(parsed.settings.len(), 1);
        assert_eq!(
            parsed.error,
            Some(OptionsError::InvalidArgument("foo".into()))
        );
        assert_eq!(invalid("foo -X"), "-X");
        let error = parse("-X").error.unwrap();
        assert_eq!(
            error.to_string(),
            "invalid command-line argument for server process: -X"
        );
        assert_eq!(
            error.hint(),
            Some("Try \"postgres --help\" for more information.")
        );
    }

    #[test]
    fn parsing_is_linear_in_the_worst_case() {
        // The startup packet's cap, of what makes the most work: switches, escapes,
        // words that are no switch (moved on every switch after them).
        for unit in ["-e ", "\\ ", "x -e ", "-c a.b=1 "] {
            let text = unit.repeat(10_000 / unit.len());
            let started = std::time::Instant::now();
            let _ = parse(&text);
            // A hang guard, not a timing assertion: quadratic work would take minutes.
            assert!(started.elapsed() < std::time::Duration::from_secs(30));
        }
    }
}
