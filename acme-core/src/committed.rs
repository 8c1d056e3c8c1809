//! The table states this process's writers committed, for its readers.
//!
//! Every Delta commit leaves its writer holding the table's state at the new version (the file
//! list the commit's log replay produced). A reader in the same process that then loads that
//! version (a warehouse refresh pinned to the round the change stream just committed, or the
//! first handle on a model a fold just stored) would replay the same log entries again; it
//! takes the writer's state instead. States are matched by table location, Delta table id and
//! version, so a table dropped and created again at the same location is never mistaken for
//! the old one. A few recent versions per table are kept, and a bounded number of tables.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use deltalake::DeltaTable;
use deltalake::table::state::DeltaTableState;

/// Recent versions kept per table: a reader pinned to a commit round finds it even when the
/// writer committed another round or two meanwhile.
const VERSIONS_PER_TABLE: usize = 4;

/// Tables kept; the least recently committed is forgotten past this.
const TABLES: usize = 256;

#[derive(Default)]
struct Committed {
    /// By table location: its recent states, newest last.
    tables: HashMap<String, VecDeque<DeltaTableState>>,
    /// Table locations, least recently committed first.
    order: VecDeque<String>,
}

static COMMITTED: Mutex<Option<Committed>> = Mutex::new(None);

/// Remember `table`'s state as its writer left it after a commit.
pub(crate) fn remember(table: &DeltaTable) {
    let Some(state) = table.state.clone() else { return };
    let location = table.table_url().to_string();
    let mut guard = COMMITTED.lock().unwrap_or_else(PoisonError::into_inner);
    let committed = guard.get_or_insert_with(Committed::default);
    let states = committed.tables.entry(location.clone()).or_default();
    // A version committed again (a table created anew at the same place) replaces the old one.
    states.retain(|s| s.version() < state.version());
    states.push_back(state);
    while states.len() > VERSIONS_PER_TABLE {
        states.pop_front();
    }
    committed.order.retain(|l| l != &location);
    committed.order.push_back(location);
    while committed.order.len() > TABLES {
        if let Some(oldest) = committed.order.pop_front() {
            committed.tables.remove(&oldest);
        }
    }
}

/// The state of `table` (a reader's, loaded at an earlier version of the same table) at
/// `version`, when a writer of this process committed it and it is still kept.
pub(crate) fn recall(table: &DeltaTable, version: u64) -> Option<DeltaTableState> {
    let loaded = table.state.as_ref()?;
    let location = table.table_url().to_string();
    let guard = COMMITTED.lock().unwrap_or_else(PoisonError::into_inner);
    let states = guard.as_ref()?.tables.get(&location)?;
    states.iter().find(|s| s.version() == version && s.metadata().id() == loaded.metadata().id()).cloned()
}
