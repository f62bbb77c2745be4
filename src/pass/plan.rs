//! The order in which a pass visits the chunks of a device, fixed by the journal's superblock so a
//! resume continues the same walk.
//!
//! Why not simply 0, 1, 2, …: a filesystem's primary superblock (ext4 at byte 1024, XFS and btrfs
//! near the start, an LVM label in sector 1) and the signatures some formats keep at the end (MD
//! RAID 0.90/1.0, the backup GPT) are what blkid, udev and the kernel look at. Decrypting from
//! offset 0 made chunk 0 plaintext first: for the whole pass the half-decrypted device probed as
//! its original filesystem, with its UUID, and anything (fstab by UUID, fsck, an operator) could
//! mount it and write plaintext into the still-encrypted tail. So a decryption visits the last and
//! the first chunk last, and an encryption visits them first: at every instant of an unfinished
//! pass in either direction, the device's ends are ciphertext, and no probe finds anything there.

use super::journal::Order;
use super::Direction;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    total: u64,
    chunk: u64,
    order: Order,
    direction: Direction,
}

impl Plan {
    /// `chunk` must be non-zero (the journal bounds it) and `total` non-zero.
    pub fn new(total: u64, chunk: u64, order: Order, direction: Direction) -> Plan {
        Plan {
            total,
            chunk: chunk.max(1),
            order,
            direction,
        }
    }

    /// Number of chunks.
    pub fn count(&self) -> u64 {
        self.total.div_ceil(self.chunk)
    }

    fn guarded(&self) -> bool {
        self.order == Order::Guarded && self.count() >= 2
    }

    /// The chunk number visited at position `index`.
    pub fn chunk_at(&self, index: u64) -> u64 {
        let n = self.count();
        if !self.guarded() {
            return index;
        }
        match self.direction {
            // 0, n−1, 1, 2, …, n−2
            Direction::Encrypt => match index {
                0 => 0,
                1 => n - 1,
                i => i - 1,
            },
            // 1, 2, …, n−1, 0
            Direction::Decrypt => {
                if index + 1 == n {
                    0
                } else {
                    index + 1
                }
            }
        }
    }

    /// The position at which chunk `chunk` is visited (inverse of `chunk_at`).
    pub fn index_of(&self, chunk: u64) -> u64 {
        let n = self.count();
        if !self.guarded() {
            return chunk;
        }
        match self.direction {
            Direction::Encrypt => match chunk {
                0 => 0,
                c if c + 1 == n => 1,
                c => c + 1,
            },
            Direction::Decrypt => match chunk {
                0 => n - 1,
                c => c - 1,
            },
        }
    }

    /// Byte offset and length of chunk `chunk` (the last one may be short).
    pub fn span(&self, chunk: u64) -> (u64, u64) {
        let offset = chunk.saturating_mul(self.chunk);
        (offset, self.chunk.min(self.total.saturating_sub(offset)))
    }

    /// Bytes in the chunks visited before position `index`.
    pub fn bytes_before(&self, index: u64) -> u64 {
        let n = self.count();
        let index = index.min(n);
        let full = index.saturating_mul(self.chunk);
        let last_len = self.span(n.saturating_sub(1)).1;
        if n > 0 && self.index_of(n - 1) < index {
            full - (self.chunk - last_len)
        } else {
            full
        }
    }

    /// (offset, len) of every chunk from position `from` on, in order; constant memory.
    pub fn walk(&self, from: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        (from..self.count()).map(move |i| self.span(self.chunk_at(i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_order_visits_every_chunk_once_and_counts_bytes_right() {
        for total in [1u64, 4096, 65536, 65536 + 512, 3 * 65536, 10 * 65536 + 4096] {
            for order in [Order::Linear, Order::Guarded] {
                for direction in [Direction::Encrypt, Direction::Decrypt] {
                    let p = Plan::new(total, 65536, order, direction);
                    let n = p.count();
                    let mut seen: Vec<u64> = (0..n).map(|i| p.chunk_at(i)).collect();
                    for i in 0..n {
                        assert_eq!(p.index_of(p.chunk_at(i)), i);
                    }
                    seen.sort();
                    assert_eq!(seen, (0..n).collect::<Vec<_>>());
                    assert_eq!(p.bytes_before(n), total);
                    let mut sum = 0;
                    for (i, (_, len)) in p.walk(0).enumerate() {
                        assert_eq!(p.bytes_before(i as u64), sum);
                        sum += len;
                    }
                    assert_eq!(sum, total);
                }
            }
        }
    }

    #[test]
    fn guarded_decryption_leaves_both_ends_for_last_and_encryption_does_them_first() {
        let p = Plan::new(5 * 65536, 65536, Order::Guarded, Direction::Decrypt);
        let order: Vec<u64> = (0..5).map(|i| p.chunk_at(i)).collect();
        assert_eq!(order, vec![1, 2, 3, 4, 0]);
        let p = Plan::new(5 * 65536, 65536, Order::Guarded, Direction::Encrypt);
        let order: Vec<u64> = (0..5).map(|i| p.chunk_at(i)).collect();
        assert_eq!(order, vec![0, 4, 1, 2, 3]);
    }
}
