//! Weight matrices read where they lie in a memory-mapped checkpoint file: never copied into
//! the process's own memory, shared with every other process that maps the file, and paged in
//! as a forward first reads them.

use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::kernels::cpu::{self, Rows};

/// A whole file, mapped read-only.
pub fn map(path: &Path) -> Result<Arc<Mmap>> {
    let file = File::open(path).map_err(|source| Error::Io { path: path.into(), source })?;
    // SAFETY: the map is read-only; like every mmap reader we rely on nobody truncating the file under us.
    let map = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io { path: path.into(), source })?;
    Ok(Arc::new(map))
}

/// A (rows, cols) matrix in a format `gemv` reads, at `range` of a mapped file.
pub struct Mapped {
    map: Arc<Mmap>,
    range: Range<usize>,
    format: GgmlDType,
    shape: (usize, usize),
}

impl Mapped {
    /// None when the matrix cannot be read in place: a format `gemv` does not read, rows that are
    /// not whole groups of 32, values not aligned for their type, or bytes outside the file.
    pub fn new(map: &Arc<Mmap>, start: usize, format: GgmlDType, shape: (usize, usize)) -> Option<Self> {
        let (rows, cols) = shape;
        if cols == 0 || !cols.is_multiple_of(cpu::GROUP) {
            return None;
        }
        let len = rows.checked_mul(cols)? / format.block_size() * format.type_size();
        let range = start..start.checked_add(len)?;
        Rows::of(format, map.get(range.clone())?)?;
        Some(Self { map: map.clone(), range, format, shape })
    }

    pub fn rows(&self) -> Rows<'_> {
        Rows::of(self.format, &self.map[self.range.clone()]).expect("checked by `new`")
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }

    pub fn format(&self) -> GgmlDType {
        self.format
    }

    pub fn shape(&self) -> (usize, usize) {
        self.shape
    }

    /// `next`'s rows after this one's, when they follow it in the same file in the same format.
    pub fn join(&self, next: &Mapped) -> Option<Mapped> {
        let follows = Arc::ptr_eq(&self.map, &next.map) && self.range.end == next.range.start;
        (follows && self.format == next.format && self.shape.1 == next.shape.1).then(|| Mapped {
            map: self.map.clone(),
            range: self.range.start..next.range.end,
            format: self.format,
            shape: (self.shape.0 + next.shape.0, self.shape.1),
        })
    }
}
