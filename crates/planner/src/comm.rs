//! Collective times under the alpha-beta model (Hockney 1994; Thakur, Rabenseifner and Gropp
//! 2005): a message of S bytes over one step costs `α + S/β`. Bandwidths are nccl-tests' *bus*
//! bandwidths, so a ring all-reduce of S bytes over n ranks takes `2(n-1)·α + 2(n-1)/n · S/busbw`
//! and a reduce-scatter or all-gather half of that (nccl-tests doc/PERFORMANCE.md).

use crate::cluster::Cluster;

/// One tier of links: latency per step and achievable bus bandwidth per GPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Seconds per step (α).
    pub alpha: f64,
    /// Bytes per second (β, bus bandwidth).
    pub beta: f64,
}

impl Link {
    /// NVLink inside a node.
    pub fn intra(c: &Cluster) -> Link {
        Link { alpha: c.intra_latency_us * 1e-6, beta: c.intra_gbps * 1e9 }
    }

    /// The network between nodes.
    pub fn inter(c: &Cluster) -> Link {
        Link { alpha: c.inter_latency_us * 1e-6, beta: c.inter_gbps * 1e9 }
    }
}

/// Ring all-reduce: a reduce-scatter then an all-gather, `2(n-1)` steps of `S/n`.
pub fn ring_all_reduce(bytes: f64, n: usize, l: Link) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let n_f = n as f64;
    2.0 * (n_f - 1.0) * l.alpha + 2.0 * (n_f - 1.0) / n_f * bytes / l.beta
}

/// Tree all-reduce (NCCL's double binary tree): `2·⌈log2 n⌉` latency steps, the whole message
/// pipelined up and down the tree (`2·S/β`).
pub fn tree_all_reduce(bytes: f64, n: usize, l: Link) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    2.0 * (n as f64).log2().ceil() * l.alpha + 2.0 * bytes / l.beta
}

/// All-reduce as NCCL picks it: the faster of ring and tree.
pub fn all_reduce(bytes: f64, n: usize, l: Link) -> f64 {
    ring_all_reduce(bytes, n, l).min(tree_all_reduce(bytes, n, l))
}

/// Ring reduce-scatter (or all-gather) of a buffer of `bytes` (the whole, not the shard).
pub fn reduce_scatter(bytes: f64, n: usize, l: Link) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let n_f = n as f64;
    (n_f - 1.0) * l.alpha + (n_f - 1.0) / n_f * bytes / l.beta
}

/// Point-to-point transfer.
pub fn p2p(bytes: f64, l: Link) -> f64 {
    l.alpha + bytes / l.beta
}

/// A group of `n` ranks, `per_node` of them on each node it spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    /// Ranks in the group.
    pub n: usize,
    /// Ranks of the group on one node (1 when each is on its own node).
    pub per_node: usize,
}

impl Group {
    /// Nodes the group spans.
    pub fn nodes(&self) -> usize {
        self.n.div_ceil(self.per_node.max(1))
    }
}

/// Hierarchical all-reduce for a group spanning nodes: reduce-scatter inside the node, all-reduce
/// of the `1/g` shard between nodes (each GPU on its own NIC), all-gather inside the node. Inside
/// one node it is a plain all-reduce over NVLink.
pub fn hierarchical_all_reduce(bytes: f64, g: Group, c: &Cluster) -> f64 {
    let (intra, inter) = (Link::intra(c), Link::inter(c));
    let (per, nodes) = (g.per_node.min(g.n).max(1), g.nodes());
    if nodes <= 1 {
        return all_reduce(bytes, g.n, intra);
    }
    2.0 * reduce_scatter(bytes, per, intra) + all_reduce(bytes / per as f64, nodes, inter)
}

/// Hierarchical reduce-scatter (or all-gather): inside the node, then the `1/g` shard between nodes.
pub fn hierarchical_reduce_scatter(bytes: f64, g: Group, c: &Cluster) -> f64 {
    let (intra, inter) = (Link::intra(c), Link::inter(c));
    let (per, nodes) = (g.per_node.min(g.n).max(1), g.nodes());
    if nodes <= 1 {
        return reduce_scatter(bytes, g.n, intra);
    }
    reduce_scatter(bytes, per, intra) + reduce_scatter(bytes / per as f64, nodes, inter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_matches_nccl_tests_bus_bandwidth() {
        let l = Link { alpha: 0.0, beta: 100e9 };
        // busbw = 2(n-1)/n · S / t: the time at the link's bus bandwidth.
        let t = ring_all_reduce(1e9, 8, l);
        assert!((2.0 * 7.0 / 8.0 * 1e9 / t - 100e9).abs() < 1.0);
        assert_eq!(ring_all_reduce(1e9, 1, l), 0.0);
        assert!((reduce_scatter(1e9, 8, l) * 2.0 - t).abs() < 1e-12);
    }

    #[test]
    fn tree_wins_on_latency_for_small_messages_at_scale() {
        let l = Link { alpha: 10e-6, beta: 50e9 };
        let (small, large) = (1e3, 1e10);
        assert!(tree_all_reduce(small, 1024, l) < ring_all_reduce(small, 1024, l));
        // Large messages: both move about 2·S at the bus bandwidth.
        let (ring, tree) = (ring_all_reduce(large, 1024, l), tree_all_reduce(large, 1024, l));
        assert!((ring - tree).abs() / ring < 0.06, "{ring} {tree}");
        assert_eq!(all_reduce(small, 1024, l), tree_all_reduce(small, 1024, l));
    }

    #[test]
    fn hierarchical_is_faster_than_a_flat_ring_over_the_network() {
        let c = Cluster::preset("h100-sxm").unwrap();
        let g = Group { n: 64, per_node: 8 };
        let flat = ring_all_reduce(4e9, 64, Link::inter(&c));
        let hier = hierarchical_all_reduce(4e9, g, &c);
        assert!(hier < flat / 4.0, "{hier} vs {flat}");
        // One node: NVLink only.
        let one = hierarchical_all_reduce(4e9, Group { n: 8, per_node: 8 }, &c);
        assert_eq!(one, all_reduce(4e9, 8, Link::intra(&c)));
    }
}
