//! The decoder's cursor: a forward-only view of one message in which every read is
//! bounds-checked and names the field it was reading when the bytes run out. The parent
//! module's `deny` list (no indexing, unwrap, panic or unchecked arithmetic) applies here too.

use super::DecodeError;

/// A forward-only cursor over a message; every read is bounds-checked and reports the field it
/// was reading when the buffer runs out.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(super) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Truncated { what })?;
        self.buf = rest;
        Ok(*head)
    }

    pub(super) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let [byte] = self.array(what)?;
        Ok(byte)
    }

    pub(super) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    pub(super) fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    pub(super) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    pub(super) fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    /// An Int32 length or count, which must not be negative.
    pub(super) fn len(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let len = self.i32(what)?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength { what, len })
    }

    pub(super) fn bytes(
        &mut self,
        len: usize,
        what: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        let (head, rest) = self
            .buf
            .split_at_checked(len)
            .ok_or(DecodeError::Truncated { what })?;
        self.buf = rest;
        Ok(head)
    }

    /// A NUL-terminated string's bytes, without the NUL.
    pub(super) fn cstr(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let nul = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated { what })?;
        let (s, rest) = self
            .buf
            .split_at_checked(nul)
            .ok_or(DecodeError::Truncated { what })?;
        // `rest` starts with the NUL found above; skip it.
        let (_, after) = rest.split_first().ok_or(DecodeError::Truncated { what })?;
        self.buf = after;
        Ok(s)
    }

    pub(super) fn str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.cstr(what)?).map_err(|_| DecodeError::InvalidUtf8 { what })
    }
}
