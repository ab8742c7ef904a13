//! Consistent hashing: which node owns which entity.

use sha2::{Digest, Sha256};

/// Points per node on the ring unless configured otherwise.
pub const DEFAULT_VNODES: u32 = 64;

/// A consistent-hash ring over node names.
///
/// Every node places `vnodes` points on a 64-bit circle (the first 8 bytes
/// of SHA-256 of `name#i`); a key belongs to the node of the first point at
/// or after the key's hash. Two nodes that see the same members compute the
/// same owner for every key, whatever order they learnt the members in. A
/// node joining takes keys only for itself, and a node leaving gives up only
/// its own keys: nothing else moves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HashRing {
    nodes: Vec<String>,
    points: Vec<(u64, u32)>,
}

fn hash(bytes: &[u8]) -> u64 {
    let digest = Sha256::digest(bytes);
    u64::from_be_bytes(digest[..8].try_into().expect("SHA-256 has 32 bytes"))
}

impl HashRing {
    /// A ring over `nodes` (duplicates ignored) with `vnodes` points each
    /// (at least 1).
    pub fn new<I, S>(nodes: I, vnodes: u32) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        nodes.sort();
        nodes.dedup();
        let vnodes = vnodes.max(1);
        let mut points = Vec::with_capacity(nodes.len() * vnodes as usize);
        for (i, node) in nodes.iter().enumerate() {
            for v in 0..vnodes {
                points.push((hash(format!("{node}#{v}").as_bytes()), i as u32));
            }
        }
        // Ties (astronomically unlikely) break by node order: deterministic.
        points.sort_unstable();
        Self { nodes, points }
    }

    /// The members, sorted.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// Whether the ring has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node that owns `key`, or None on an empty ring.
    pub fn owner(&self, key: &str) -> Option<&str> {
        if self.points.is_empty() {
            return None;
        }
        let h = hash(key.as_bytes());
        let i = self.points.partition_point(|(p, _)| *p < h);
        let (_, node) = self.points[if i == self.points.len() { 0 } else { i }];
        Some(&self.nodes[node as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Removing a node moves only that node's keys; every other key keeps
        /// its owner. Adding it back restores the original placement.
        #[test]
        fn a_leaving_node_moves_only_its_own_keys(
            n in 2usize..7,
            gone in 0usize..7,
            keys in proptest::collection::vec("[a-z0-9/]{1,24}", 1..200),
        ) {
            let all = names(n);
            let gone = &all[gone % n];
            let full = HashRing::new(all.clone(), 32);
            let less = HashRing::new(all.iter().filter(|m| *m != gone).cloned(), 32);
            for k in &keys {
                let before = full.owner(k).unwrap();
                let after = less.owner(k).unwrap();
                prop_assert_ne!(after, gone.as_str());
                if before != gone {
                    prop_assert_eq!(before, after, "key {} moved needlessly", k);
                }
            }
        }

        /// The owner does not depend on the order members were learnt in.
        #[test]
        fn placement_is_independent_of_member_order(
            mut order in Just(names(5)).prop_shuffle(),
            keys in proptest::collection::vec("[a-z0-9]{1,16}", 1..100),
        ) {
            let sorted = HashRing::new(names(5), 16);
            order.push(order[0].clone()); // a duplicate is ignored
            let shuffled = HashRing::new(order, 16);
            for k in &keys {
                prop_assert_eq!(sorted.owner(k), shuffled.owner(k));
            }
        }
    }

    #[test]
    fn keys_spread_over_every_node() {
        let ring = HashRing::new(names(3), DEFAULT_VNODES);
        let mut counts = std::collections::HashMap::new();
        for i in 0..30_000 {
            *counts
                .entry(ring.owner(&format!("session/{i}")).unwrap().to_owned())
                .or_insert(0usize) += 1;
        }
        assert_eq!(counts.len(), 3);
        for (node, c) in counts {
            // 10,000 each when perfectly even; 64 points each keeps every
            // node within a factor of two of that.
            assert!((5_000..20_000).contains(&c), "{node} owns {c} of 30,000");
        }
    }

    #[test]
    fn an_empty_ring_owns_nothing() {
        assert_eq!(HashRing::new(Vec::<String>::new(), 8).owner("x"), None);
        assert_eq!(HashRing::new(["solo"], 8).owner("x"), Some("solo"));
    }
}
