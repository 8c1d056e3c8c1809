//! A zero-copy decoder of PostgreSQL's logical replication protocol (`pgoutput`, version 1).
//!
//! Messages borrow from the input buffer; tuple fields are handed out as slices, so decoding a
//! change allocates nothing. Malformed input is an error, never a panic.

use crate::error::{IngestError, Result};

/// One column of a relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key.
    pub key: bool,
    /// Column name.
    pub name: String,
    /// Type oid.
    pub type_oid: u32,
    /// Type modifier.
    pub typmod: i32,
}

/// A relation (table) description, sent before the first change of a table in a session and
/// again after its definition changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Table oid.
    pub oid: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting (`f` full, `d` default, `n` nothing, `i` index).
    pub replica_identity: u8,
    /// Columns.
    pub columns: Vec<RelationColumn>,
}

/// One field of a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<'a> {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value (not sent).
    Unchanged,
    /// A value in text format.
    Text(&'a [u8]),
    /// A value in binary format (the type's send function).
    Binary(&'a [u8]),
}

/// The fields of one row, decoded lazily.
#[derive(Debug, Clone, Copy)]
pub struct TupleData<'a> {
    count: u16,
    body: &'a [u8],
}

impl<'a> TupleData<'a> {
    /// Iterate the fields.
    pub fn fields(&self) -> FieldIter<'a> {
        FieldIter { left: self.count, cursor: Cursor { data: self.body, pos: 0 } }
    }
}

/// Iterator over the fields of a [`TupleData`].
#[derive(Debug, Clone)]
pub struct FieldIter<'a> {
    left: u16,
    cursor: Cursor<'a>,
}

impl<'a> Iterator for FieldIter<'a> {
    type Item = Result<Field<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        Some(read_field(&mut self.cursor))
    }
}

fn read_field<'a>(c: &mut Cursor<'a>) -> Result<Field<'a>> {
    Ok(match c.u8()? {
        b'n' => Field::Null,
        b'u' => Field::Unchanged,
        b't' => {
            let len = c.len32()?;
            Field::Text(c.bytes(len)?)
        }
        b'b' => {
            let len = c.len32()?;
            Field::Binary(c.bytes(len)?)
        }
        other => return Err(bad(&format!("unknown tuple field kind 0x{other:02x}"))),
    })
}

/// A decoded pgoutput message.
#[derive(Debug, Clone)]
pub enum Message<'a> {
    /// Start of a transaction.
    Begin {
        /// LSN of the commit record (the transaction's position).
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_ts: i64,
        /// Transaction id.
        xid: u32,
    },
    /// End of a transaction.
    Commit {
        /// LSN just past the commit record. (The message also carries the commit record's own
        /// LSN and the commit time, which `Begin` already gave.)
        end_lsn: u64,
    },
    /// A relation description.
    Relation(Relation),
    /// A row inserted.
    Insert {
        /// Table oid.
        relation: u32,
        /// The new row.
        new: TupleData<'a>,
    },
    /// A row updated.
    Update {
        /// Table oid.
        relation: u32,
        /// The old row (or its key), when the replica identity sends it.
        old: Option<TupleData<'a>>,
        /// The new row.
        new: TupleData<'a>,
    },
    /// A row deleted.
    Delete {
        /// Table oid.
        relation: u32,
        /// The old row (or its key).
        old: TupleData<'a>,
    },
    /// Tables truncated.
    Truncate {
        /// Table oids.
        relations: Vec<u32>,
    },
    /// Type, origin and logical messages: nothing to store.
    Ignored,
}

/// Decode one pgoutput message.
pub fn decode(data: &[u8]) -> Result<Message<'_>> {
    let mut c = Cursor { data, pos: 0 };
    let message = match c.u8()? {
        b'B' => Message::Begin { final_lsn: c.u64()?, commit_ts: c.i64()?, xid: c.u32()? },
        b'C' => {
            let _flags = c.u8()?;
            // Flags (one byte, read above), the commit record's LSN, the end LSN, the commit time.
            let _commit_lsn = c.u64()?;
            let end_lsn = c.u64()?;
            let _commit_ts = c.i64()?;
            Message::Commit { end_lsn }
        }
        b'R' => {
            let oid = c.u32()?;
            let schema = c.cstr()?.to_string();
            let name = c.cstr()?.to_string();
            let replica_identity = c.u8()?;
            let count = c.u16()?;
            let mut columns = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let flags = c.u8()?;
                let name = c.cstr()?.to_string();
                columns.push(RelationColumn { key: flags & 1 == 1, name, type_oid: c.u32()?, typmod: c.i32()? });
            }
            Message::Relation(Relation { oid, schema, name, replica_identity, columns })
        }
        b'I' => {
            let relation = c.u32()?;
            expect(&mut c, b'N')?;
            Message::Insert { relation, new: tuple(&mut c)? }
        }
        b'U' => {
            let relation = c.u32()?;
            let mut kind = c.u8()?;
            let mut old = None;
            if kind == b'K' || kind == b'O' {
                old = Some(tuple(&mut c)?);
                kind = c.u8()?;
            }
            if kind != b'N' {
                return Err(bad("update without a new tuple"));
            }
            Message::Update { relation, old, new: tuple(&mut c)? }
        }
        b'D' => {
            let relation = c.u32()?;
            match c.u8()? {
                b'K' | b'O' => Message::Delete { relation, old: tuple(&mut c)? },
                _ => return Err(bad("delete without an old tuple")),
            }
        }
        b'T' => {
            let count = c.u32()?;
            let _options = c.u8()?;
            if count as usize > data.len() {
                return Err(bad("truncate lists more relations than bytes"));
            }
            let mut relations = Vec::with_capacity(count as usize);
            for _ in 0..count {
                relations.push(c.u32()?);
            }
            Message::Truncate { relations }
        }
        b'Y' | b'O' | b'M' => Message::Ignored,
        other => return Err(bad(&format!("unknown message type 0x{other:02x}"))),
    };
    Ok(message)
}

fn expect(c: &mut Cursor<'_>, byte: u8) -> Result<()> {
    if c.u8()? == byte { Ok(()) } else { Err(bad(&format!("expected '{}'", byte as char))) }
}

/// Read a tuple and skip over its fields (validated), returning a lazy view.
fn tuple<'a>(c: &mut Cursor<'a>) -> Result<TupleData<'a>> {
    let count = c.u16()?;
    let start = c.pos;
    for _ in 0..count {
        read_field(c)?;
    }
    Ok(TupleData { count, body: &c.data[start..c.pos] })
}

fn bad(message: &str) -> IngestError {
    IngestError::BadMessage { message: message.to_string() }
}

#[derive(Debug, Clone)]
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| bad("message is truncated"))?;
        let out = &self.data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let b = self.bytes(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn len32(&mut self) -> Result<usize> {
        let len = self.i32()?;
        usize::try_from(len).map_err(|_| bad("negative length"))
    }

    fn cstr(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&b| b == 0).ok_or_else(|| bad("unterminated string"))?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| bad("string is not UTF-8"))?;
        self.pos += end + 1;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_with_binary_and_null_fields_decodes_without_copying() {
        let mut msg = vec![b'I', 0, 0, 0x40, 0x01, b'N', 0, 3];
        msg.extend_from_slice(&[b'b', 0, 0, 0, 8]);
        msg.extend_from_slice(&42i64.to_be_bytes());
        msg.push(b'n');
        msg.extend_from_slice(&[b't', 0, 0, 0, 2, b'h', b'i']);
        let Message::Insert { relation, new } = decode(&msg).expect("decodes") else { panic!("not an insert") };
        assert_eq!(relation, 0x4001);
        let fields: Vec<Field<'_>> = new.fields().collect::<Result<_>>().expect("fields");
        assert_eq!(fields, vec![Field::Binary(&42i64.to_be_bytes()), Field::Null, Field::Text(b"hi")]);
    }

    /// Valid messages of every kind, the seeds of the mutation test (the fuzz corpus holds
    /// the same ones).
    fn seeds() -> Vec<Vec<u8>> {
        let mut tuple = 3u16.to_be_bytes().to_vec();
        tuple.extend_from_slice(&[b'b', 0, 0, 0, 8]);
        tuple.extend_from_slice(&42i64.to_be_bytes());
        tuple.push(b'n');
        tuple.extend_from_slice(&[b't', 0, 0, 0, 7]);
        tuple.extend_from_slice(b"PENDING");
        let mut relation = vec![b'R', 0, 0, 0x40, 0];
        relation.extend_from_slice(b"operations\0orders\0f");
        relation.extend_from_slice(&2u16.to_be_bytes());
        relation.extend_from_slice(b"\x01order_id\0");
        relation.extend_from_slice(&[0, 0, 0, 20, 0xff, 0xff, 0xff, 0xff]);
        relation.extend_from_slice(b"\0status\0");
        relation.extend_from_slice(&[0, 0, 4, 19, 0xff, 0xff, 0xff, 0xff]);
        let mut begin = vec![b'B'];
        begin.extend_from_slice(&0x16B_3748u64.to_be_bytes());
        begin.extend_from_slice(&754_000_000_000_000i64.to_be_bytes());
        begin.extend_from_slice(&741u32.to_be_bytes());
        let mut commit = vec![b'C', 0];
        commit.extend_from_slice(&0x16B_3748u64.to_be_bytes());
        commit.extend_from_slice(&0x16B_3778u64.to_be_bytes());
        commit.extend_from_slice(&754_000_000_000_000i64.to_be_bytes());
        let row = |kind: u8, parts: &[u8]| {
            let mut m = vec![kind, 0, 0, 0x40, 0];
            for part in parts {
                m.push(*part);
                m.extend_from_slice(&tuple);
            }
            m
        };
        vec![
            begin,
            commit,
            relation,
            row(b'I', b"N"),
            row(b'U', b"ON"),
            row(b'D', b"O"),
            vec![b'T', 0, 0, 0, 2, 0, 0, 0, 0x40, 0, 0, 0, 0x40, 6],
        ]
    }

    /// Decode and walk every field; the result does not matter, only that nothing panics.
    fn exercise(data: &[u8]) {
        if let Ok(message) = decode(data) {
            let tuples = match message {
                Message::Insert { new, .. } => vec![new],
                Message::Update { old, new, .. } => old.into_iter().chain([new]).collect(),
                Message::Delete { old, .. } => vec![old],
                _ => Vec::new(),
            };
            for tuple in tuples {
                for field in tuple.fields() {
                    if field.is_err() {
                        break;
                    }
                }
            }
        }
    }

    #[test]
    fn seeds_decode() {
        for seed in seeds() {
            assert!(decode(&seed).is_ok(), "seed {:?}", seed.first().map(|b| *b as char));
        }
    }

    /// A bounded, deterministic stand-in for the cargo-fuzz target (`fuzz/`): 1,000,000 random
    /// mutations of valid messages (bit flips, overwritten bytes and lengths, cuts, insertions).
    #[test]
    fn mutated_messages_never_panic() {
        let mut state = 0x5EED_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seeds = seeds();
        for _ in 0..1_000_000 {
            let mut data = seeds[(next() % seeds.len() as u64) as usize].clone();
            for _ in 0..=(next() % 4) {
                let at = (next() % (data.len() as u64 + 1)) as usize;
                match next() % 5 {
                    0 if at < data.len() => data[at] ^= 1 << (next() % 8),
                    1 if at < data.len() => data[at] = next() as u8,
                    2 if at + 4 <= data.len() => data[at..at + 4].copy_from_slice(&(next() as u32).to_be_bytes()),
                    3 => data.truncate(at),
                    _ => data.insert(at.min(data.len()), next() as u8),
                }
            }
            exercise(&data);
        }
    }

    #[test]
    fn truncated_and_unknown_messages_are_errors_not_panics() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[b'B', 0, 0]).is_err());
        assert!(decode(&[b'I', 0, 0, 0, 1, b'N', 0, 1, b'b', 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode(b"Z").is_err());
        assert!(decode(&[b'T', 0xff, 0xff, 0xff, 0xff, 0]).is_err());
        assert!(decode(&[b'R', 0, 0, 0, 1, b'a']).is_err());
    }
}
