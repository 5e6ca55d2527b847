//! A client's book of prepared statements: its names, and the one copy of each text
//! they use.

use std::collections::HashMap;
use std::sync::LazyLock;

use bytes::Bytes;

use super::super::state::Effect;

/// A statement as the pooler knows it: its server-side name and the Parse that
/// creates it there.
#[derive(Debug, Clone)]
pub struct Statement {
    pub global: Bytes,
    /// A whole Parse message naming `global`. Shared (reference-counted) by every name
    /// of the client that stands for the same text.
    pub parse: Bytes,
    /// What executing it may do to the session (state.rs).
    pub(super) effect: Effect,
}

/// What a name costs in the books beyond its own bytes (the map entry, the global
/// name, the `Statement`): counted so that 10,000 one-byte names are not free.
const NAME_OVERHEAD: usize = 96;
/// What a text costs beyond its Parse message (its entry in `texts`).
const TEXT_OVERHEAD: usize = 64;

/// One client's statements, by the names it gave them. A text is held once however
/// many names use it (a driver that prepares one query under a new name per
/// connection checkout, or a client that tries to fill the pooler's memory with
/// copies), and every byte held is counted for `max_client_prepared_bytes`.
///
/// A client with none (most idle clients, every simple-protocol one) carries one
/// pointer: the two maps (96 bytes) are boxed when it prepares its first statement,
/// and dropped when it parks with none left ([`ClientStatements::shed`]), not with
/// its last: a driver that prepares and closes a statement per query keeps its maps
/// (and their capacity) while it is busy. It reads as [`Books`].
#[derive(Debug, Default)]
pub struct ClientStatements {
    books: Option<Box<Books>>,
}

/// What a client that has no statements reads.
static EMPTY: LazyLock<Books> = LazyLock::new(Books::default);

impl std::ops::Deref for ClientStatements {
    type Target = Books;

    fn deref(&self) -> &Books {
        self.books.as_deref().unwrap_or(&EMPTY)
    }
}

impl ClientStatements {
    /// Books `name` as `stmt`, sharing its text with any other name that has it;
    /// returns what the name stood for before.
    pub(super) fn insert(&mut self, name: Bytes, stmt: Statement) -> Option<Statement> {
        self.books
            .get_or_insert_with(Default::default)
            .insert(name, stmt)
    }

    /// Takes `name` out of the books.
    pub(super) fn remove(&mut self, name: &[u8]) -> Option<(Bytes, Statement)> {
        self.books.as_mut()?.remove(name)
    }

    /// Keeps only the names `keep` says to.
    pub(super) fn retain(&mut self, keep: impl FnMut(&Bytes) -> bool) {
        if let Some(books) = self.books.as_mut() {
            books.retain(keep);
        }
    }

    /// For a client about to park: drops the maps if no statement is left in them.
    pub fn shed(&mut self) {
        if self.books.as_ref().is_some_and(|b| b.by_name.is_empty()) {
            self.books = None;
        }
    }
}

/// The books themselves.
#[derive(Debug, Default)]
pub struct Books {
    pub(super) by_name: HashMap<Bytes, Statement>,
    /// Each text once, by its global name: the shared Parse and how many names use it.
    texts: HashMap<Bytes, (Bytes, usize)>,
    /// Bytes held: every name, and every distinct text once.
    bytes: usize,
}

impl Books {
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Bytes of names and texts held (what `max_client_prepared_bytes` bounds).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The bytes a new name for `stmt` would add.
    pub(super) fn cost_of(&self, name: &[u8], stmt: &Statement) -> usize {
        let text = if self.texts.contains_key(&stmt.global) {
            0
        } else {
            stmt.parse.len() + TEXT_OVERHEAD
        };
        name.len() + NAME_OVERHEAD + text
    }

    /// The shared Parse of a text some name of the client already uses.
    pub(super) fn text(&self, global: &[u8]) -> Option<Bytes> {
        self.texts.get(global).map(|(parse, _)| parse.clone())
    }

    pub(super) fn get(&self, name: &[u8]) -> Option<&Statement> {
        self.by_name.get(name)
    }

    pub(super) fn get_key_value(&self, name: &[u8]) -> Option<(&Bytes, &Statement)> {
        self.by_name.get_key_value(name)
    }

    fn insert(&mut self, name: Bytes, mut stmt: Statement) -> Option<Statement> {
        match self.texts.get_mut(&stmt.global) {
            Some((parse, users)) => {
                *users += 1;
                stmt.parse = parse.clone();
            }
            None => {
                self.bytes += stmt.parse.len() + TEXT_OVERHEAD;
                self.texts
                    .insert(stmt.global.clone(), (stmt.parse.clone(), 1));
            }
        }
        self.bytes += name.len() + NAME_OVERHEAD;
        let previous = self.by_name.insert(name.clone(), stmt);
        if let Some(old) = &previous {
            self.bytes -= name.len() + NAME_OVERHEAD;
            self.release(&old.global);
        }
        previous
    }

    fn remove(&mut self, name: &[u8]) -> Option<(Bytes, Statement)> {
        let (name, stmt) = self.by_name.remove_entry(name)?;
        self.bytes -= name.len() + NAME_OVERHEAD;
        self.release(&stmt.global);
        Some((name, stmt))
    }

    fn retain(&mut self, mut keep: impl FnMut(&Bytes) -> bool) {
        let gone: Vec<Bytes> = self
            .by_name
            .keys()
            .filter(|name| !keep(name))
            .cloned()
            .collect();
        for name in gone {
            self.remove(&name);
        }
    }

    /// One name fewer uses the text named `global`.
    fn release(&mut self, global: &[u8]) {
        if let Some((parse, users)) = self.texts.get_mut(global) {
            *users -= 1;
            if *users == 0 {
                self.bytes -= parse.len() + TEXT_OVERHEAD;
                self.texts.remove(global);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmt(global: &'static [u8]) -> Statement {
        Statement {
            global: Bytes::from_static(global),
            parse: Bytes::from_static(b"P...."),
            effect: Effect::default(),
        }
    }

    #[test]
    fn the_maps_stay_while_busy_and_go_when_a_client_with_none_parks() {
        let mut books = ClientStatements::default();
        assert!(books.books.is_none() && books.is_empty());
        books.insert(Bytes::from_static(b"s1"), stmt(b"g1"));
        books.remove(b"s1");
        // Prepare-and-close per query: the maps are kept for the next one.
        assert!(books.books.is_some() && books.is_empty() && books.bytes() == 0);
        books.insert(Bytes::from_static(b"s2"), stmt(b"g2"));
        books.shed();
        assert!(books.books.is_some(), "a statement left: kept");
        books.retain(|_| false);
        books.shed();
        assert!(books.books.is_none());
    }
}
