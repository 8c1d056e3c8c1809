//! The framing of PostgreSQL's binary `COPY` format: a signature and header, then rows of
//! length-prefixed fields, then a trailer. [`CopyFrames`] splits the stream into rows as its
//! chunks arrive, whatever their boundaries, and checks every length against the bytes at hand
//! before it reads them.
//!
//! It depends on nothing but `std`, so that the fuzz target (`fuzz/fuzz_targets/copy.rs`)
//! compiles this file on its own: the bytes come from a server and are not trusted.

/// The 11-byte signature that opens a binary COPY stream.
pub const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Fixed header length: the signature, a flags field and the header extension's length.
const HEADER: usize = 19;

/// A binary COPY stream that breaks the format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError(pub String);

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FrameError {}

/// What a row callback of [`CopyFrames::feed`] or the framing itself stopped with.
#[derive(Debug)]
pub enum FeedError<E> {
    /// The bytes break the COPY format.
    Frame(FrameError),
    /// The row callback failed.
    Row(E),
}

/// Splits one binary COPY stream of rows with a known number of columns into rows.
#[derive(Debug)]
pub struct CopyFrames {
    columns: usize,
    /// Bytes of an incomplete row (or header) kept for the next chunk.
    carry: Vec<u8>,
    header_done: bool,
    trailer_seen: bool,
    /// Field slices of the row being handed out, reused from row to row.
    fields: Vec<(usize, i32)>,
}

impl CopyFrames {
    /// A stream whose rows have `columns` fields each.
    pub fn new(columns: usize) -> Self {
        Self {
            columns,
            carry: Vec::new(),
            header_done: false,
            trailer_seen: false,
            fields: Vec::with_capacity(columns),
        }
    }

    /// Frame every complete row of `chunk` (after what earlier chunks left over) and hand each
    /// to `row` as its fields in column order (`None`: NULL). An incomplete row at the end is
    /// kept for the next chunk.
    pub fn feed<E>(
        &mut self,
        chunk: &[u8],
        row: &mut impl FnMut(&[Option<&[u8]>]) -> Result<(), E>,
    ) -> Result<(), FeedError<E>> {
        if self.carry.is_empty() {
            let consumed = self.parse(chunk, row)?;
            self.carry.extend_from_slice(&chunk[consumed..]);
        } else {
            let mut data = std::mem::take(&mut self.carry);
            data.extend_from_slice(chunk);
            let consumed = self.parse(&data, row)?;
            data.drain(..consumed);
            self.carry = data;
        }
        Ok(())
    }

    /// After the last chunk: the stream must have ended with its trailer and nothing after it.
    pub fn finish(&self) -> Result<(), FrameError> {
        if !self.trailer_seen || !self.carry.is_empty() {
            return Err(FrameError("stream ended before the COPY trailer".into()));
        }
        Ok(())
    }

    /// Frame every complete row of `data`; returns the bytes consumed.
    fn parse<E>(
        &mut self,
        data: &[u8],
        row: &mut impl FnMut(&[Option<&[u8]>]) -> Result<(), E>,
    ) -> Result<usize, FeedError<E>> {
        let bad = |message: &str| FeedError::Frame(FrameError(message.to_string()));
        let mut pos = 0;
        if !self.header_done {
            if data.len() < HEADER {
                return Ok(0);
            }
            if &data[..SIGNATURE.len()] != SIGNATURE {
                return Err(bad("missing PGCOPY signature"));
            }
            let extension = i32::from_be_bytes([data[15], data[16], data[17], data[18]]);
            let Ok(extension) = usize::try_from(extension) else {
                return Err(bad("negative header extension length"));
            };
            let Some(header) = HEADER.checked_add(extension) else { return Err(bad("header extension too long")) };
            if data.len() < header {
                return Ok(0);
            }
            pos = header;
            self.header_done = true;
        }
        let mut values: Vec<Option<&[u8]>> = Vec::with_capacity(self.columns);
        loop {
            if self.trailer_seen {
                if pos < data.len() {
                    return Err(bad("data after the COPY trailer"));
                }
                return Ok(pos);
            }
            if data.len() - pos < 2 {
                return Ok(pos);
            }
            let count = i16::from_be_bytes([data[pos], data[pos + 1]]);
            if count == -1 {
                self.trailer_seen = true;
                pos += 2;
                continue;
            }
            if usize::try_from(count).ok() != Some(self.columns) {
                return Err(bad(&format!("row has {count} fields, expected {}", self.columns)));
            }
            // The whole row must be here before any field is handed out.
            self.fields.clear();
            let mut cursor = pos + 2;
            for _ in 0..self.columns {
                if data.len() - cursor < 4 {
                    return Ok(pos);
                }
                let len = i32::from_be_bytes([data[cursor], data[cursor + 1], data[cursor + 2], data[cursor + 3]]);
                cursor += 4;
                self.fields.push((cursor, len));
                match usize::try_from(len) {
                    Ok(len) if data.len() - cursor < len => return Ok(pos),
                    Ok(len) => cursor += len,
                    Err(_) if len == -1 => {}
                    Err(_) => return Err(bad("negative field length")),
                }
            }
            values.clear();
            values.extend(
                self.fields.iter().map(|&(start, len)| usize::try_from(len).ok().map(|len| &data[start..start + len])),
            );
            row(&values).map_err(FeedError::Row)?;
            pos = cursor;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(rows: &[&[Option<&[u8]>]]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        for row in rows {
            out.extend_from_slice(&(row.len() as i16).to_be_bytes());
            for field in *row {
                match field {
                    None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(bytes) => {
                        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
                        out.extend_from_slice(bytes);
                    }
                }
            }
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    fn frame_in_chunks(data: &[u8], chunk: usize, columns: usize) -> Result<Vec<Vec<Option<Vec<u8>>>>, String> {
        let mut frames = CopyFrames::new(columns);
        let mut rows = Vec::new();
        let mut collect = |fields: &[Option<&[u8]>]| {
            rows.push(fields.iter().map(|f| f.map(<[u8]>::to_vec)).collect());
            Ok::<_, ()>(())
        };
        for piece in data.chunks(chunk) {
            frames.feed(piece, &mut collect).map_err(|e| format!("{e:?}"))?;
        }
        frames.finish().map_err(|e| e.0)?;
        Ok(rows)
    }

    #[test]
    fn rows_come_out_whole_whatever_the_chunk_boundaries() {
        let data = stream(&[&[Some(b"ab"), None], &[Some(b""), Some(b"xyz")]]);
        let expected = vec![vec![Some(b"ab".to_vec()), None], vec![Some(Vec::new()), Some(b"xyz".to_vec())]];
        for chunk in 1..=data.len() {
            assert_eq!(frame_in_chunks(&data, chunk, 2).expect("frames"), expected, "chunks of {chunk} bytes");
        }
    }

    #[test]
    fn broken_streams_are_errors() {
        let data = stream(&[&[Some(b"ab")]]);
        assert!(frame_in_chunks(&data[..data.len() - 2], 7, 1).expect_err("must fail").contains("trailer"));
        assert!(frame_in_chunks(&data, 7, 2).expect_err("must fail").contains("expected 2"));
        let mut bad = data.clone();
        bad[0] = b'X';
        assert!(frame_in_chunks(&bad, 64, 1).expect_err("must fail").contains("signature"));
        let mut negative = data.clone();
        negative[21..25].copy_from_slice(&(-5i32).to_be_bytes());
        assert!(frame_in_chunks(&negative, 64, 1).expect_err("must fail").contains("negative field length"));
        let mut extra = data;
        extra.push(0);
        assert!(frame_in_chunks(&extra, 64, 1).expect_err("must fail").contains("after the COPY trailer"));
    }
}
