//! [`Rng`]: a small seeded generator (xorshift64*) for the tests' random mixes, so a
//! failing seed reproduces the same choices. No dependency, and the same numbers on
//! every machine.

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// A generator whose state is `state` as it is (must not be 0).
    pub fn from_state(state: u64) -> Rng {
        Rng(state.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// In `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True `percent` times in a hundred (tenths of a percent are kept).
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(1000) < percent * 10
    }

    /// True `p` times in a thousand.
    pub fn permille(&mut self, p: u64) -> bool {
        self.below(1000) < p
    }

    /// In `lo..=hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn a_seed_gives_the_same_numbers() {
        let a: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.below(100)))
            .collect();
        let b: Vec<u64> = (0..5)
            .scan(Rng::new(7), |r, _| Some(r.below(100)))
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|n| *n < 100));
        assert_ne!(
            a,
            (0..5)
                .scan(Rng::new(8), |r, _| Some(r.below(100)))
                .collect::<Vec<_>>()
        );
    }
}
