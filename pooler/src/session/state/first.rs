//! The keywords a statement's first word is looked up among.

/// The first words of a statement that the classifier acts on: the one list of them,
/// which the full pass (classify.rs) and the quick look (plain.rs) both ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum First {
    Set,
    Reset,
    Listen,
    Load,
    Prepare,
    Create,
    Declare,
    Discard,
    Unlisten,
    /// `DEALLOCATE`, `CLOSE`: may remove state.
    Check,
    Drop,
    Alter,
    /// `DO`, `CALL`: code the pooler cannot see into.
    Opaque,
    /// `SELECT`, `WITH`: only `INTO TEMP` or `pg_temp` in them matters.
    Select,
    /// `EXPLAIN`: with `ANALYZE` it runs the statement after it (a `CREATE TEMP TABLE
    /// … AS`, say), whose first word is not the text's.
    Explain,
}

impl First {
    /// The keyword `word` is, in any case, if the classifier acts on it.
    pub(super) fn of(word: &[u8]) -> Option<First> {
        let mut key = [0u8; 10];
        // Longer than any keyword below.
        let k = key.get_mut(..word.len())?;
        k.copy_from_slice(word);
        k.make_ascii_uppercase();
        Some(match &*k {
            b"SET" => First::Set,
            b"RESET" => First::Reset,
            b"LISTEN" => First::Listen,
            b"LOAD" => First::Load,
            b"PREPARE" => First::Prepare,
            b"CREATE" => First::Create,
            b"DECLARE" => First::Declare,
            b"DISCARD" => First::Discard,
            b"UNLISTEN" => First::Unlisten,
            b"DEALLOCATE" | b"CLOSE" => First::Check,
            b"DROP" => First::Drop,
            b"ALTER" => First::Alter,
            b"DO" | b"CALL" => First::Opaque,
            b"SELECT" | b"WITH" => First::Select,
            b"EXPLAIN" => First::Explain,
            _ => return None,
        })
    }
}
