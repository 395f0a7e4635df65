//! The dependency map as a picture (workloads on the left, upstreams on the
//! right, an edge's width by its requests, revoked edges marked), and which
//! edges a revocation about to be made would cut.

use leash_api::policy::WorkloadMatcher;
use maud::{Markup, html};

use super::RevokeForm;
use crate::admin::types::{Edge, Revocation};

/// The edges (workload → upstream, by use) the revocation in `f` would cut.
pub fn affected<'a>(f: &RevokeForm, edges: &'a [Edge]) -> Vec<&'a Edge> {
    let matcher = WorkloadMatcher::parse(f.workload.trim()).ok();
    let workload_matches = |w: &str| matcher.as_ref().is_some_and(|m| m.matches(w));
    let upstream = f.upstream.trim();
    edges
        .iter()
        .filter(|e| match f.kind.as_str() {
            "workload" => workload_matches(&e.workload),
            "upstream" => e.upstream == upstream,
            "grant" => workload_matches(&e.workload) && e.upstream == upstream,
            // The edges were read for this one credential.
            "credential" => true,
            _ => false,
        })
        .collect()
}

/// Whether an active revocation cuts `e`.
fn revoked(e: &Edge, revocations: &[Revocation]) -> bool {
    revocations.iter().filter(|r| r.active).any(|r| {
        let w = || WorkloadMatcher::parse(&r.workload).is_ok_and(|m| m.matches(&e.workload));
        match r.kind.as_str() {
            "workload" => w(),
            "upstream" => r.upstream == e.upstream,
            "grant" => r.upstream == e.upstream && w(),
            _ => false,
        }
    })
}

const ROW: f64 = 44.0;
const WIDTH: f64 = 900.0;
const LEFT: f64 = 300.0;
const RIGHT: f64 = 600.0;

/// The map as inline SVG.
pub fn svg(edges: &[Edge], revocations: &[Revocation]) -> Markup {
    let mut workloads: Vec<&str> = edges.iter().map(|e| e.workload.as_str()).collect();
    workloads.sort_unstable();
    workloads.dedup();
    let mut upstreams: Vec<&str> = edges.iter().map(|e| e.upstream.as_str()).collect();
    upstreams.sort_unstable();
    upstreams.dedup();
    let rows = workloads.len().max(upstreams.len()).max(1);
    let height = ROW * rows as f64 + 20.0;
    let y = |i: usize| 30.0 + ROW * i as f64;
    let max = edges.iter().map(|e| e.requests).max().unwrap_or(1).max(1) as f64;
    let index = |list: &[&str], name: &str| list.iter().position(|n| *n == name).unwrap_or(0);
    html! {
        svg class="map" viewBox={ "0 0 " (WIDTH) " " (height) } role="img"
            aria-label="Dependency map: workloads to upstreams" {
            @for e in edges {
                @let (y1, y2) = (y(index(&workloads, &e.workload)), y(index(&upstreams, &e.upstream)));
                @let width = 1.5 + 10.0 * (e.requests as f64 / max);
                @let cut = revoked(e, revocations);
                path class=(if cut { "edge revoked" } else { "edge" })
                    d={ "M" (LEFT) " " (y1) " C" (LEFT + 150.0) " " (y1) " " (RIGHT - 150.0) " " (y2) " " (RIGHT) " " (y2) }
                    stroke-width=(format!("{width:.1}")) {
                    title { (e.workload) " → " (e.upstream) ": " (e.requests) " requests" @if cut { " (revoked)" } }
                }
            }
            @for (i, w) in workloads.iter().enumerate() {
                circle class="node" cx=(LEFT) cy=(y(i)) r="5" {}
                text class="label" x=(LEFT - 10.0) y=(y(i) + 4.0) text-anchor="end" { (short(w)) title { (w) } }
            }
            @for (i, u) in upstreams.iter().enumerate() {
                circle class="node" cx=(RIGHT) cy=(y(i)) r="5" {}
                text class="label" x=(RIGHT + 10.0) y=(y(i) + 4.0) { (u) }
            }
        }
    }
}

/// A SPIFFE ID without its scheme and trust domain, for a label.
fn short(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .map_or(id, |(_, path)| path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(w: &str, u: &str, requests: i64) -> Edge {
        Edge {
            workload: w.into(),
            upstream: u.into(),
            credential_kind: "jwt".into(),
            requests,
            credentials: 1,
            errors: 0,
            first_seen_ms: 0,
            last_used_ms: 0,
        }
    }

    #[test]
    fn a_revocation_cuts_the_edges_it_names() {
        let edges = [
            edge("spiffe://t/ns/a/sa/x", "payments", 5),
            edge("spiffe://t/ns/a/sa/y", "payments", 1),
            edge("spiffe://t/ns/a/sa/x", "ledger", 2),
        ];
        let form = |kind: &str, workload: &str, upstream: &str| RevokeForm {
            kind: kind.into(),
            workload: workload.into(),
            upstream: upstream.into(),
            ..Default::default()
        };
        assert_eq!(affected(&form("upstream", "", "payments"), &edges).len(), 2);
        assert_eq!(
            affected(&form("workload", "spiffe://t/ns/a/sa/x", ""), &edges).len(),
            2
        );
        assert_eq!(
            affected(&form("workload", "spiffe://t/ns/a/*", ""), &edges).len(),
            3
        );
        assert_eq!(
            affected(&form("grant", "spiffe://t/ns/a/sa/x", "ledger"), &edges).len(),
            1
        );
        // Labels are escaped text: a hostile workload name stays text.
        let svg = svg(&[edge("spiffe://t/<script>", "u", 1)], &[]).into_string();
        assert!(!svg.contains("<script>"), "{svg}");
    }
}
