//! Upload sessions: how a large attachment is cut into `PUT` chunks.

use std::ops::RangeInclusive;

/// Graph wants every chunk but the last to be a multiple of 320 KiB.
pub const UPLOAD_CHUNK_UNIT: usize = 320 * 1024;

/// Chunk size for upload sessions: 12 × 320 KiB = 3.75 MiB, under Graph's 4 MiB per request.
pub const UPLOAD_CHUNK_SIZE: usize = 12 * UPLOAD_CHUNK_UNIT;

const _: () = assert!(UPLOAD_CHUNK_SIZE < 4 * 1024 * 1024);

/// The byte ranges (inclusive, as `Content-Range` names them) that upload `total` bytes in
/// chunks of `chunk` bytes. `chunk` must be a positive multiple of [`UPLOAD_CHUNK_UNIT`].
pub fn chunk_ranges(total: usize, chunk: usize) -> Vec<RangeInclusive<usize>> {
    debug_assert!(chunk > 0 && chunk.is_multiple_of(UPLOAD_CHUNK_UNIT));
    let chunk = chunk.max(UPLOAD_CHUNK_UNIT);
    (0..total).step_by(chunk).map(|start| start..=(start + chunk).min(total) - 1).collect()
}

/// The `Content-Range` header of one chunk.
pub fn content_range(range: &RangeInclusive<usize>, total: usize) -> String {
    format!("bytes {}-{}/{total}", range.start(), range.end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_is_twelve_times_320_kib() {
        assert_eq!(UPLOAD_CHUNK_SIZE, 12 * 327_680);
    }

    #[test]
    fn five_megabytes_in_two_chunks() {
        let total = 5 * 1024 * 1024;
        assert_eq!(chunk_ranges(total, UPLOAD_CHUNK_SIZE), vec![0..=3_932_159, 3_932_160..=5_242_879]);
    }

    #[test]
    fn exact_multiple_has_no_empty_tail() {
        let total = 2 * UPLOAD_CHUNK_SIZE;
        let ranges = chunk_ranges(total, UPLOAD_CHUNK_SIZE);
        assert_eq!(ranges.len(), 2);
        assert_eq!(*ranges[1].end(), total - 1);
    }

    #[test]
    fn ranges_cover_every_byte_once() {
        for total in [1, UPLOAD_CHUNK_UNIT - 1, UPLOAD_CHUNK_SIZE + 1, 150 * 1024 * 1024] {
            let ranges = chunk_ranges(total, UPLOAD_CHUNK_SIZE);
            let mut next = 0;
            for range in &ranges {
                assert_eq!(*range.start(), next);
                assert!(range.end() - range.start() < UPLOAD_CHUNK_SIZE);
                next = range.end() + 1;
            }
            assert_eq!(next, total);
        }
        assert!(chunk_ranges(0, UPLOAD_CHUNK_SIZE).is_empty());
    }

    #[test]
    fn content_range_header() {
        assert_eq!(content_range(&(0..=9), 20), "bytes 0-9/20");
        assert_eq!(content_range(&(10..=19), 20), "bytes 10-19/20");
    }
}
