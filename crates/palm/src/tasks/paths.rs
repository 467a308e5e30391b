//! Shortest paths in a random directed graph (after trlX's "random walks" task), with an exact
//! gold scorer.
//!
//! The graph is generated from the task seed: `nodes` nodes named `a`, `b`, ..., each with
//! `out_degree` distinct random successors, redrawn until every node can reach every other.
//! The graph is never shown to the model: it learns the edges from its training walks.
//!
//! Text format (byte-level, EOS = byte 0): the prompt `c>j:` asks for a path from `c` to `j`;
//! the response is the path itself, start and goal included, then EOS: `cfhj` + EOS.
//! Gold score = shortest length / path length (in edges), 1 for an optimal path, 0 for an invalid
//! one (a non-node byte, a missing edge, wrong start or end, or no EOS).
//!
//! Supervised data are random walks from the start that happen to hit the goal within
//! `max_nodes` nodes: valid but mostly far from optimal, so SFT alone scores well below 1.

use std::collections::VecDeque;

use rand::seq::SliceRandom;
use rand::Rng;

use crate::error::{Error, Result};
use crate::rlhf::scorer::Scorer;
use crate::rng::{self, PalmRng};
use crate::tokenizer::BYTE_EOS;

#[derive(Debug, Clone, PartialEq)]
pub struct PathsTask {
    pub nodes: usize,
    /// Successors of each node, sorted.
    pub adj: Vec<Vec<usize>>,
    /// Longest path (in nodes) a response may have; also the SFT walks' limit.
    pub max_nodes: usize,
    /// dist[s][g] in edges.
    dist: Vec<Vec<usize>>,
}

/// A prompt: start and goal.
pub type Query = (usize, usize);

fn letter(n: usize) -> u8 {
    b'a' + n as u8
}

impl PathsTask {
    /// The default task: 12 nodes, out-degree 3, paths of at most 10 nodes.
    pub fn standard(seed: u64) -> Result<Self> {
        Self::new(seed, 12, 3, 10)
    }

    pub fn new(seed: u64, nodes: usize, out_degree: usize, max_nodes: usize) -> Result<Self> {
        if !(2..=26).contains(&nodes) {
            return Err(Error::msg(format!(
                "paths task: nodes must be in 2..=26 (letters), got {nodes}"
            )));
        }
        if out_degree == 0 || out_degree >= nodes {
            return Err(Error::msg(format!(
                "paths task: out_degree must be in 1..{nodes}, got {out_degree}"
            )));
        }
        let mut r = rng::stream(seed, 0x7a75);
        for _attempt in 0..1000 {
            let adj: Vec<Vec<usize>> = (0..nodes)
                .map(|n| {
                    let mut others: Vec<usize> = (0..nodes).filter(|&m| m != n).collect();
                    others.shuffle(&mut r);
                    let mut s = others[..out_degree].to_vec();
                    s.sort_unstable();
                    s
                })
                .collect();
            let dist: Vec<Vec<usize>> = (0..nodes).map(|s| bfs(&adj, s)).collect();
            let connected = dist.iter().all(|row| row.iter().all(|&d| d != usize::MAX));
            let diameter = dist.iter().flatten().copied().max().unwrap_or(0);
            if connected && diameter < max_nodes {
                return Ok(Self {
                    nodes,
                    adj,
                    max_nodes,
                    dist,
                });
            }
        }
        Err(Error::msg(
            "paths task: no strongly connected graph found in 1000 draws (raise out_degree or max_nodes)",
        ))
    }

    pub fn distance(&self, s: usize, g: usize) -> usize {
        self.dist[s][g]
    }

    /// Every (start, goal) pair with start != goal.
    pub fn queries(&self) -> Vec<Query> {
        (0..self.nodes)
            .flat_map(|s| {
                (0..self.nodes)
                    .filter(move |&g| g != s)
                    .map(move |g| (s, g))
            })
            .collect()
    }

    pub fn prompt_text(&self, q: Query) -> String {
        format!("{}>{}:", letter(q.0) as char, letter(q.1) as char)
    }

    pub fn prompt_ids(&self, q: Query) -> Vec<u32> {
        self.prompt_text(q).bytes().map(u32::from).collect()
    }

    /// Reads `s>g:` back (None if it is not a prompt of this task).
    pub fn parse_prompt(&self, ids: &[u32]) -> Option<Query> {
        match ids {
            [s, gt, g, colon] if *gt == b'>' as u32 && *colon == b':' as u32 => {
                let node = |x: u32| {
                    let n = x.checked_sub(b'a' as u32)? as usize;
                    (n < self.nodes).then_some(n)
                };
                Some((node(*s)?, node(*g)?))
            }
            _ => None,
        }
    }

    /// Response ids of a path (letters, then EOS).
    pub fn response_ids(&self, path: &[usize]) -> Vec<u32> {
        let mut v: Vec<u32> = path.iter().map(|&n| letter(n) as u32).collect();
        v.push(BYTE_EOS);
        v
    }

    /// Gold score of a response (ids, EOS included when emitted) to query `q`.
    pub fn score(&self, q: Query, response: &[u32]) -> f32 {
        let Some((&last, body)) = response.split_last() else {
            return 0.0;
        };
        if last != BYTE_EOS || body.len() < 2 || body.len() > self.max_nodes {
            return 0.0;
        }
        let mut path = Vec::with_capacity(body.len());
        for &t in body {
            match t.checked_sub(b'a' as u32) {
                Some(n) if (n as usize) < self.nodes => path.push(n as usize),
                _ => return 0.0,
            }
        }
        if path[0] != q.0 || path[path.len() - 1] != q.1 {
            return 0.0;
        }
        if path
            .windows(2)
            .any(|w| self.adj[w[0]].binary_search(&w[1]).is_err())
        {
            return 0.0;
        }
        self.dist[q.0][q.1] as f32 / (path.len() - 1) as f32
    }

    /// A shortest path (BFS, lowest ids first).
    pub fn shortest_path(&self, q: Query) -> Vec<usize> {
        let mut prev = vec![usize::MAX; self.nodes];
        let mut queue = VecDeque::from([q.0]);
        prev[q.0] = q.0;
        while let Some(n) = queue.pop_front() {
            if n == q.1 {
                break;
            }
            for &m in &self.adj[n] {
                if prev[m] == usize::MAX {
                    prev[m] = n;
                    queue.push_back(m);
                }
            }
        }
        let mut path = vec![q.1];
        while *path.last().unwrap_or(&q.0) != q.0 {
            let p = prev[path[path.len() - 1]];
            path.push(p);
        }
        path.reverse();
        path
    }

    /// A random walk from the start that reaches the goal within `max_nodes` nodes (None if this
    /// draw does not). Stops at the first visit to the goal.
    pub fn random_walk(&self, q: Query, r: &mut PalmRng) -> Option<Vec<usize>> {
        let mut path = vec![q.0];
        while path.len() < self.max_nodes {
            let here = path[path.len() - 1];
            let next = self.adj[here][r.random_range(0..self.adj[here].len())];
            path.push(next);
            if next == q.1 {
                return Some(path);
            }
        }
        None
    }

    /// `n` supervised examples (prompt ids, response ids): random queries, random walks.
    pub fn sft_examples(&self, n: usize, r: &mut PalmRng) -> Vec<(Vec<u32>, Vec<u32>)> {
        let qs = self.queries();
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let q = qs[r.random_range(0..qs.len())];
            if let Some(p) = self.random_walk(q, r) {
                out.push((self.prompt_ids(q), self.response_ids(&p)));
            }
        }
        out
    }

    /// Mean gold score of the random-walk distribution (what imitation alone converges to).
    pub fn walk_baseline(&self, n: usize, r: &mut PalmRng) -> f32 {
        let ex = self.sft_examples(n, r);
        let total: f32 = ex
            .iter()
            .map(|(p, resp)| self.parse_prompt(p).map_or(0.0, |q| self.score(q, resp)))
            .sum();
        total / n as f32
    }
}

fn bfs(adj: &[Vec<usize>], s: usize) -> Vec<usize> {
    let mut d = vec![usize::MAX; adj.len()];
    d[s] = 0;
    let mut q = VecDeque::from([s]);
    while let Some(n) = q.pop_front() {
        for &m in &adj[n] {
            if d[m] == usize::MAX {
                d[m] = d[n] + 1;
                q.push_back(m);
            }
        }
    }
    d
}

impl Scorer for PathsTask {
    fn score(&self, prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Result<Vec<f32>> {
        prompts
            .iter()
            .zip(responses)
            .enumerate()
            .map(|(i, (p, r))| {
                let q = self.parse_prompt(p).ok_or_else(|| {
                    Error::msg(format!("paths task: prompt {i} is not of the form `s>g:`"))
                })?;
                Ok(PathsTask::score(self, q, r))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// a -> b, b -> c, c -> a, a -> c (hand-built)
    fn tiny() -> PathsTask {
        let adj = vec![vec![1, 2], vec![2], vec![0]];
        let dist = (0..3).map(|s| bfs(&adj, s)).collect();
        PathsTask {
            nodes: 3,
            adj,
            max_nodes: 6,
            dist,
        }
    }

    fn ids(s: &str) -> Vec<u32> {
        let mut v: Vec<u32> = s.bytes().map(u32::from).collect();
        v.push(BYTE_EOS);
        v
    }

    #[test]
    fn gold_score_hand_computed() {
        let t = tiny();
        assert_eq!(t.distance(1, 0), 2); // b -> c -> a
        assert_eq!(t.score((1, 0), &ids("bca")), 1.0);
        assert_eq!(t.score((0, 2), &ids("ac")), 1.0);
        assert_eq!(t.score((0, 2), &ids("abc")), 0.5); // 1 / 2
        assert_eq!(t.score((0, 2), &ids("acabc")), 0.25); // 1 / 4
        assert_eq!(t.score((0, 2), &ids("bc")), 0.0); // wrong start
        assert_eq!(t.score((0, 2), &ids("ab")), 0.0); // wrong end
        assert_eq!(t.score((1, 0), &ids("ba")), 0.0); // no edge b -> a
        assert_eq!(t.score((0, 2), &ids("aXc")), 0.0); // not a node
        assert_eq!(t.score((0, 2), &ids("ad")), 0.0); // node outside the graph
        assert_eq!(t.score((0, 2), &[b'a' as u32, b'c' as u32]), 0.0); // no EOS
        assert_eq!(t.score((0, 2), &ids("acacacac")), 0.0); // longer than max_nodes
        assert_eq!(t.score((0, 2), &[]), 0.0);
    }

    #[test]
    fn generated_graph_is_connected_and_deterministic() {
        let a = PathsTask::standard(7).unwrap();
        let b = PathsTask::standard(7).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, PathsTask::standard(8).unwrap());
        for q in a.queries() {
            let p = a.shortest_path(q);
            assert_eq!(p.len() - 1, a.distance(q.0, q.1));
            assert_eq!(a.score(q, &a.response_ids(&p)), 1.0, "{q:?} {p:?}");
            assert_eq!(a.parse_prompt(&a.prompt_ids(q)), Some(q));
        }
        assert_eq!(a.queries().len(), 12 * 11);
    }

    #[test]
    fn sft_walks_are_valid_and_mostly_suboptimal() {
        let t = PathsTask::standard(0).unwrap();
        let mut r = rng::seeded(1);
        let ex = t.sft_examples(500, &mut r);
        let scores: Vec<f32> = ex
            .iter()
            .map(|(p, resp)| t.score(t.parse_prompt(p).unwrap(), resp))
            .collect();
        assert!(scores.iter().all(|&s| s > 0.0));
        let mean = scores.iter().sum::<f32>() / 500.0;
        let optimal = scores.iter().filter(|&&s| s == 1.0).count();
        assert!(
            mean < 0.75 && optimal < 400,
            "mean {mean}, optimal {optimal}"
        );
    }

    #[test]
    fn scorer_rejects_a_foreign_prompt() {
        let t = tiny();
        let e = Scorer::score(&t, &[vec![1, 2, 3]], &[ids("ab")]).unwrap_err();
        assert!(e.to_string().contains("prompt 0"), "{e}");
    }
}
