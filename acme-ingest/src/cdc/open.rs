//! Opening a change stream: check the source, make sure the slot, publication (or capture
//! triggers) and the initial snapshot exist, and refuse what cannot be resumed safely.

use std::sync::Arc;

use acme_core::raw;
use acme_core::{AcmeConfig, CdcMode, LayerTable, Lsn, Storage};
use tokio_postgres::Client;

use super::{CAPTURE_META, PUBLICATION_META, SLOT_META, sql};
use crate::error::{IngestError, Result};
use crate::replication::{ReplicationConnection, create_slot_exporting_snapshot};
use crate::snapshot::{SNAPSHOT_META, Snapshot, SnapshotPoint, SnapshotProgress};
use crate::source::{SourceTable, SourceUrl};
use crate::triggers::Changelog;

/// What [`bootstrap`] leaves ready to stream.
pub(super) struct Opened {
    pub(super) url: SourceUrl,
    pub(super) client: Client,
    pub(super) storage: Storage,
    pub(super) sources: Vec<SourceTable>,
    pub(super) layers: Vec<LayerTable>,
    pub(super) snapshot: SnapshotPoint,
    /// The changelog, when capturing with triggers.
    pub(super) changelog: Option<Changelog>,
}

/// Check the source, make sure slot, publication and snapshot exist (running the initial
/// snapshot when the raw layer has none), and return what the stream starts from.
pub(super) async fn bootstrap(config: &AcmeConfig, progress: Option<Arc<SnapshotProgress>>) -> Result<Opened> {
    let url = SourceUrl::parse(config.source_url.as_deref().ok_or(IngestError::NoSource)?)?
        .with_timeout(config.source_timeout);
    let storage = Storage::new(&config.storage_url, config.storage_options.clone())?;
    let client = url.connect().await?;
    let triggers = config.cdc_mode == CdcMode::Triggers;
    if !triggers {
        check_source(&client).await?;
    }
    let mut sources = Vec::with_capacity(config.tables.len());
    for name in &config.tables {
        let table = SourceTable::load(&client, &config.schema, name).await?;
        // Triggers see whole old rows whatever the replica identity.
        if !triggers && table.replica_identity != 'f' {
            return Err(IngestError::ReplicaIdentity { table: table.qualified() });
        }
        sources.push(table);
    }
    // Is there a complete snapshot already?
    let mut layers = Vec::with_capacity(sources.len());
    for table in &sources {
        let schema = table.raw_schema();
        let mut layer = storage.open_or_create_raw(&table.name, &schema, &table.primary_key).await?;
        // Columns added to the source while acme was not running.
        let fields: Vec<_> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        layer.add_columns(&fields).await?;
        layers.push(layer);
    }
    let mut snapshot_positions = Vec::new();
    for layer in &layers {
        snapshot_positions.push(layer.position(raw::SNAPSHOT_APP).await?);
    }
    let snapshot_complete = snapshot_positions.iter().all(|p| p.is_some() && *p == snapshot_positions[0]);
    // Capture methods cannot be switched on one warehouse (a warehouse without the marker
    // predates the trigger fallback: logical decoding filled it).
    let method = if triggers { "triggers" } else { "logical decoding" };
    let stored_method = match storage.get_meta(CAPTURE_META).await? {
        Some(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        None if snapshot_complete => Some("logical decoding".to_string()),
        None => None,
    };
    if let Some(stored) = stored_method
        && stored != method
    {
        return Err(IngestError::CaptureMethodChanged { stored, configured: method.to_string() });
    }
    let changelog = triggers.then(|| Changelog::new(&config.slot));
    if let Some(changelog) = &changelog {
        if snapshot_complete {
            if let Some(table) = changelog.missing_trigger(&client, &sources).await? {
                return Err(IngestError::CaptureTriggerMissing { table });
            }
            // Every trigger is in place: this brings the function and the triggers' arguments
            // to this version's (an earlier version's did not split key changes).
            changelog.install(&client, &sources).await?;
        } else {
            // Triggers first: every transaction that commits after the snapshot is captured.
            storage.put_meta(CAPTURE_META, method.as_bytes().to_vec()).await?;
            changelog.install(&client, &sources).await?;
            let mut snapshot = Snapshot::new(config.clone());
            if let Some(progress) = progress.clone() {
                snapshot = snapshot.with_progress(progress);
            }
            let report = snapshot.await?;
            tracing::info!(lsn = %report.lsn, "initial snapshot complete; capturing changes with triggers");
            for layer in &mut layers {
                layer.refresh().await?;
            }
        }
    }
    // The slot and publication the warehouse was synced through, if it records them.
    type Changed = fn(String, String) -> IngestError;
    let names: [(&str, &String, Changed); 2] = [
        (SLOT_META, &config.slot, |stored, configured| IngestError::SlotNameChanged { stored, configured }),
        (PUBLICATION_META, &config.publication, |stored, configured| IngestError::PublicationNameChanged {
            stored,
            configured,
        }),
    ];
    for (meta, configured, changed) in names {
        if snapshot_complete
            && !triggers
            && let Some(stored) = storage.get_meta(meta).await?
            && stored != configured.as_bytes()
        {
            return Err(changed(String::from_utf8_lossy(&stored).into_owned(), configured.clone()));
        }
    }
    if !triggers {
        // (After the check above: a mistyped name must not create a publication.)
        ensure_publication(&client, config, &sources).await?;
    }
    let slot = if triggers { SlotState::Ready } else { slot_state(&client, &config.slot).await? };
    let snapshot_complete = snapshot_complete || triggers;
    match (slot, snapshot_complete) {
        (SlotState::Lost, _) | (SlotState::Missing, true) => {
            return Err(IngestError::SlotLost { slot: config.slot.clone() });
        }
        (SlotState::Ready, true) => {}
        (state, false) => {
            // No complete snapshot yet (first run, or a run that died mid-snapshot): nothing
            // was streamed, so (re)create the slot and copy exactly its exported snapshot.
            if matches!(state, SlotState::Ready) {
                // Drop it only if this warehouse created it (a run that died mid-snapshot);
                // a slot of another warehouse must never be touched.
                let ours = storage.get_meta(SLOT_META).await?.is_some_and(|owner| owner == config.slot.as_bytes());
                if !ours {
                    return Err(IngestError::SlotInUse { slot: config.slot.clone() });
                }
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&config.slot])
                    .await
                    .map_err(sql(format!("dropping the unused replication slot {}", config.slot)))?;
            }
            storage.put_meta(SLOT_META, config.slot.as_bytes().to_vec()).await?;
            storage.put_meta(PUBLICATION_META, config.publication.as_bytes().to_vec()).await?;
            storage.put_meta(CAPTURE_META, method.as_bytes().to_vec()).await?;
            let mut replication = ReplicationConnection::connect(&url).await?;
            let created = create_slot_exporting_snapshot(&mut replication, &config.slot).await?;
            let lsn = Lsn::parse(&created.consistent_point)?;
            tracing::info!(slot = %config.slot, %lsn, "replication slot created");
            let mut snapshot = Snapshot::new(config.clone()).with_exported_snapshot(created.snapshot_name, lsn);
            if let Some(progress) = progress {
                snapshot = snapshot.with_progress(progress);
            }
            let report = snapshot.await;
            replication.close().await;
            let report = report?;
            tracing::info!(lsn = %report.lsn, "initial snapshot complete");
            for layer in &mut layers {
                layer.refresh().await?;
            }
        }
    }
    let snapshot = match storage.get_meta(SNAPSHOT_META).await? {
        Some(bytes) => SnapshotPoint::from_json(&bytes)?,
        None => {
            return Err(IngestError::WarehouseDamaged {
                what: format!("raw layer holds a snapshot but _acme/{SNAPSHOT_META} is missing"),
            });
        }
    };
    if let Some(changelog) = &changelog {
        // Changes of transactions the snapshot holds (committed before it) are not replayed.
        changelog.drop_snapshot_changes(&client, &snapshot.visibility).await?;
    }
    Ok(Opened { url, client, storage, sources, layers, snapshot, changelog })
}

pub(super) enum SlotState {
    Missing,
    Ready,
    Lost,
}

pub(super) async fn slot_state(client: &Client, slot: &str) -> Result<SlotState> {
    let row = client
        .query_opt(
            "SELECT coalesce(wal_status, ''), plugin::text, coalesce(database::text, ''), current_database()::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql(format!("looking up replication slot {slot}")))?;
    Ok(match row {
        None => SlotState::Missing,
        Some(r) if r.get::<_, String>(2) != r.get::<_, String>(3) => {
            return Err(IngestError::SlotUnusable {
                slot: slot.to_string(),
                reason: format!(
                    "belongs to database `{}`, not `{}`: set another slot name (config `slot`, `--slot`)",
                    r.get::<_, String>(2),
                    r.get::<_, String>(3)
                ),
            });
        }
        Some(r) if r.get::<_, String>(0) == "lost" => SlotState::Lost,
        Some(r) if r.get::<_, String>(1) != "pgoutput" => {
            return Err(IngestError::SlotUnusable {
                slot: slot.to_string(),
                reason: format!(
                    "uses plugin {} instead of pgoutput: drop it or choose another slot name (config `slot`, `--slot`)",
                    r.get::<_, String>(1)
                ),
            });
        }
        Some(_) => SlotState::Ready,
    })
}

/// The oldest source server the logical stream works with: pgoutput's `binary` and `messages`
/// options need PostgreSQL 14 (`server_version_num` 140000).
pub const MIN_SERVER_VERSION: i32 = 140000;

async fn check_source(client: &Client) -> Result<()> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), current_user::text, \
             (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), \
             current_setting('server_version_num')::int, current_setting('server_version')",
            &[],
        )
        .await
        .map_err(sql("checking the source settings"))?;
    let (version, version_text): (i32, String) = (row.get(3), row.get(4));
    if version < MIN_SERVER_VERSION {
        return Err(IngestError::ServerTooOld { version: version_text });
    }
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        return Err(IngestError::WalLevel { actual: wal_level });
    }
    let user: String = row.get(1);
    if !row.get::<_, bool>(2) {
        return Err(IngestError::NoReplicationPrivilege { user });
    }
    Ok(())
}

async fn ensure_publication(client: &Client, config: &AcmeConfig, tables: &[SourceTable]) -> Result<()> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&config.publication])
        .await
        .map_err(sql("looking up the publication"))?
        .is_some();
    if !exists {
        let list: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
        // The comment marks it as acme's: `teardown` removes only publications acme created.
        let name = crate::source::quote_ident(&config.publication);
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {name} FOR TABLE {}; COMMENT ON PUBLICATION {name} IS {}",
                list.join(", "),
                crate::teardown::quote_literal(&crate::teardown::publication_mark(&config.slot)),
            ))
            .await
            .map_err(sql(format!("creating publication {}", config.publication)))?;
    }
    match unpublished(client, &config.publication, tables.iter()).await? {
        Some(table) => Err(IngestError::NotPublished { publication: config.publication.clone(), table }),
        None => Ok(()),
    }
}

/// The first of `tables` that `publication` does not publish (qualified name), if any.
pub(super) async fn unpublished(
    client: &Client,
    publication: &str,
    tables: impl Iterator<Item = &SourceTable>,
) -> Result<Option<String>> {
    for table in tables {
        let published = client
            .query_opt(
                "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
                &[&publication, &table.schema, &table.name],
            )
            .await
            .map_err(sql("reading the publication's tables"))?
            .is_some();
        if !published {
            return Ok(Some(table.qualified()));
        }
    }
    Ok(None)
}
