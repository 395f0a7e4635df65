//! The console's pages. maud escapes every value it inserts: a SPIFFE ID,
//! reason or error message from anyone is text, never markup. No page shows
//! a token, secret or leaked value (the API does not return them).

use maud::{DOCTYPE, Markup, html};

use super::RevokeForm;
use super::session::Signed;
use crate::admin::types::{
    Edge, ReplicaList, Revocation, RevocationList, RevocationStatus, SidecarList,
};
use crate::auth::Role;

fn when(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let ago = (crate::store::now_ms() - ms).max(0) / 1000;
    match ago {
        0..60 => format!("{ago} s ago"),
        60..3600 => format!("{} min ago", ago / 60),
        3600..86_400 => format!("{} h ago", ago / 3600),
        _ => format!("{} d ago", ago / 86_400),
    }
}

fn layout(title: &str, s: Option<&Signed>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Leash" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body {
                header {
                    a.brand href="/console/fleet" { "Leash" }
                    @if let Some(s) = s {
                        nav {
                            a href="/console/fleet" { "Fleet" }
                            a href="/console/revocations" { "Revocations" }
                            @if s.caller.role >= Role::Responder {
                                a href="/console/revoke" { "Revoke" }
                            }
                            a href="/console/map" { "Dependency map" }
                        }
                        form.signout method="post" action="/console/sign-out" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            span.who { (s.caller.actor) " (" (s.caller.role.as_str()) ")" }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub fn message(title: &str, text: &str) -> Markup {
    layout(
        title,
        None,
        html! {
            h1 { (title) }
            p.error { (text) }
            p { a href="/console/fleet" { "Back to the console" } }
        },
    )
}

pub fn sign_in(why: Option<&str>, error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            h1 { "Sign in" }
            @if let Some(w) = why { p.note { (w) } }
            form.card method="post" action="/console/sign-in" {
                label for="token" { "Admin API token" }
                input #token type="password" name="token" autocomplete="off" required placeholder="lsh_…";
                @if let Some(e) = error { p.error #token-error { (e) } }
                button type="submit" { "Sign in" }
                p.hint { "Use a token from " code { "leash-control-plane tokens create" } ". It is exchanged for a session cookie and never shown again." }
            }
        },
    )
}

pub fn fleet(
    s: &Signed,
    list: &SidecarList,
    replicas: &ReplicaList,
    stale_after_ms: i64,
) -> Markup {
    let now = crate::store::now_ms();
    layout(
        "Fleet",
        Some(s),
        html! {
            h1 { "Fleet" }
            p { (list.sidecars.len()) " sidecar session(s) connected; revocation sequence " (list.seq) "." }
            table #sidecars {
                thead { tr { th { "Workload" } th { "Version" } th { "Acknowledged seq" } th { "Last heard" } th { "Replica" } } }
                tbody {
                    @for c in &list.sidecars {
                        // Behind the sequence and silent since: it has not
                        // applied a change the others have.
                        @let stale = c.last_ack_seq < list.seq && now - c.last_heard_ms > stale_after_ms;
                        tr class=(if stale { "stale" } else { "" }) {
                            td.id { (c.spiffe_id) }
                            td { (c.version) }
                            td { (c.last_ack_seq) @if c.last_ack_seq < list.seq { " (behind)" } }
                            td { (when(c.last_heard_ms)) @if stale { " · stale" } }
                            td.id { (c.replica) }
                        }
                    }
                }
            }
            h2 { "Control-plane replicas" }
            table #replicas {
                thead { tr { th { "Replica" } th { "State" } th { "Sidecars" } th { "Seen" } th { "Version" } } }
                tbody {
                    @for r in replicas.replicas.iter().filter(|r| r.live) {
                        tr { td.id { (r.id) @if r.this { " (this)" } } td { "live" } td { (r.sidecars) } td { (when(r.seen_at_ms)) } td { (r.version) } }
                    }
                }
            }
        },
    )
}

fn target(r: &Revocation) -> String {
    match r.kind.as_str() {
        "grant" => format!("{} → {}", r.workload, r.upstream),
        "workload" => r.workload.clone(),
        "upstream" => r.upstream.clone(),
        "credential" => r.credential_id.clone(),
        "leaked" => format!("leaked value {}", r.fingerprint_id.as_deref().unwrap_or("")),
        _ => String::new(),
    }
}

pub fn revocations(s: &Signed, list: &RevocationList, all: bool) -> Markup {
    layout(
        "Revocations",
        Some(s),
        html! {
            h1 { "Revocations" }
            p {
                @if all { a href="/console/revocations" { "Active only" } } @else { a href="/console/revocations?all=true" { "Include restored" } }
            }
            table #revocations {
                thead { tr { th { "Seq" } th { "Kind" } th { "What" } th { "Why" } th { "By" } th { "When" } th { "State" } } }
                tbody {
                    @for r in &list.revocations {
                        tr {
                            td { a href={ "/console/revocations/" (r.id) } { (r.seq) } }
                            td { (r.kind) }
                            td.id { (target(r)) }
                            td { (r.reason) }
                            td.id { (r.revoked_by) }
                            td { (when(r.revoked_at_ms)) }
                            td { @if r.active { "active" } @else { "restored" } }
                        }
                    }
                }
            }
        },
    )
}

pub fn revocation(s: &Signed, st: &RevocationStatus) -> Markup {
    let r = &st.revocation;
    let p = &st.propagation;
    let restorable = r.active && matches!(r.kind.as_str(), "grant" | "workload" | "upstream");
    layout(
        "Revocation",
        Some(s),
        html! {
            h1 { "Revocation " (r.seq) }
            dl.facts {
                dt { "Id" } dd.id { (r.id) }
                dt { "Kind" } dd { (r.kind) }
                dt { "What" } dd.id { (target(r)) }
                dt { "Why" } dd { (r.reason) }
                dt { "By" } dd.id { (r.revoked_by) " · " (when(r.revoked_at_ms)) }
                dt { "State" } dd #state { @if r.active { "active" } @else { "restored" } }
                @if let Some(x) = &r.restored {
                    dt { "Restored" } dd { (x.by) " · " (x.reason) " · " (when(x.at_ms)) }
                }
            }
            h2 { "Propagation" }
            p #counts {
                span #acked { (p.acknowledged.len()) } " acknowledged, "
                span #pending-count { (p.pending.len()) } " pending, of "
                span #connected { (p.connected) } " connected sidecar(s)."
            }
            table #acks data-live={ "/console/revocations/" (r.id) "/live" } {
                thead { tr { th { "Sidecar" } th { "Session" } th { "Latency" } th { "When" } } }
                tbody {
                    @for a in &p.acknowledged {
                        tr data-session=(a.session_id) { td.id { (a.spiffe_id) } td.id { (a.session_id) } td { (a.latency_ms) " ms" } td { (when(a.acked_at_ms)) } }
                    }
                }
            }
            @if !p.pending.is_empty() {
                h3 { "Not acknowledged yet" }
                ul #pending { @for x in &p.pending { li.id { (x.spiffe_id) " (at seq " (x.last_ack_seq) ")" } } }
            }
            @if restorable && s.caller.role >= Role::Responder {
                h2 { "Restore" }
                form.card method="post" action={ "/console/revocations/" (r.id) "/restore" } {
                    input type="hidden" name="csrf" value=(s.csrf);
                    label for="restore-reason" { "Why restore" }
                    input #restore-reason name="reason" required;
                    button.danger type="submit" { "Restore" }
                }
            }
        },
    )
}

const KINDS: [(&str, &str); 4] = [
    ("grant", "A grant: one workload (or prefix) to one upstream"),
    ("workload", "A workload (or prefix): all its upstreams"),
    ("upstream", "An upstream: for every workload"),
    ("credential", "One issued credential"),
];

fn field(
    name: &str,
    label: &str,
    value: &str,
    error: Option<&(&str, String)>,
    hint: &str,
) -> Markup {
    let err = error.filter(|(f, _)| *f == name);
    html! {
        label for=(name) { (label) }
        input id=(name) name=(name) value=(value) aria-invalid=(if err.is_some() { "true" } else { "false" });
        @if let Some((_, m)) = err { p.error id={ (name) "-error" } { (m) } }
        @if !hint.is_empty() { p.hint { (hint) } }
    }
}

pub fn revoke_form(s: &Signed, f: &RevokeForm, error: Option<(&str, String)>) -> Markup {
    let error = error.as_ref();
    layout(
        "Revoke",
        Some(s),
        html! {
            h1 { "Revoke" }
            form.card method="post" action="/console/revoke" {
                input type="hidden" name="csrf" value=(s.csrf);
                fieldset {
                    legend { "What" }
                    @for (k, label) in KINDS {
                        label.choice {
                            input type="radio" name="kind" value=(k) checked[f.kind == k || (f.kind.is_empty() && k == "grant")];
                            " " (label)
                        }
                    }
                    @if let Some((_, m)) = error.filter(|(f, _)| *f == "kind") { p.error #kind-error { (m) } }
                }
                (field("workload", "Workload", &f.workload, error, "spiffe://trust-domain/path, or a prefix ending in /*"))
                (field("upstream", "Upstream", &f.upstream, error, "an upstream name from policy"))
                (field("credential_id", "Credential id", &f.credential_id, error, "a JWT's jti, a static lease, an OAuth2 token id"))
                (field("reason", "Why", &f.reason, error, "goes in the audit log"))
                button type="submit" { "Show who will break" }
            }
        },
    )
}

pub fn revoke_confirm(s: &Signed, f: &RevokeForm, breaks: &[&Edge]) -> Markup {
    let requests: i64 = breaks.iter().map(|e| e.requests).sum();
    layout(
        "Confirm revocation",
        Some(s),
        html! {
            h1 { "Who will break" }
            p #impact {
                @if breaks.is_empty() {
                    "No recorded use in the last 30 days: nothing is known to break."
                } @else {
                    (breaks.len()) " workload→upstream edge(s), " (requests) " request(s) in the last 30 days, will be refused."
                }
            }
            @if !breaks.is_empty() {
                table #breaks {
                    thead { tr { th { "Workload" } th { "Upstream" } th { "Requests (30 d)" } th { "Last use" } } }
                    tbody {
                        @for e in breaks {
                            tr { td.id { (e.workload) } td { (e.upstream) } td { (e.requests) } td { (when(e.last_used_ms)) } }
                        }
                    }
                }
            }
            form.card method="post" action="/console/revoke/confirm" {
                input type="hidden" name="csrf" value=(s.csrf);
                input type="hidden" name="kind" value=(f.kind);
                input type="hidden" name="workload" value=(f.workload);
                input type="hidden" name="upstream" value=(f.upstream);
                input type="hidden" name="credential_id" value=(f.credential_id);
                input type="hidden" name="reason" value=(f.reason);
                p { "Revoke " strong { (f.kind) } " " span.id { (f.workload) " " (f.upstream) " " (f.credential_id) } ": " (f.reason) }
                button.danger #confirm type="submit" { "Revoke now" }
                " "
                a href="/console/revoke" { "Cancel" }
            }
        },
    )
}

pub fn map(s: &Signed, since: &str, svg: Markup) -> Markup {
    layout(
        "Dependency map",
        Some(s),
        html! {
            h1 { "Dependency map" }
            form.inline method="get" action="/console/map" {
                label for="since" { "Used since" }
                select #since name="since" {
                    @for (v, l) in [("1h", "the last hour"), ("1d", "the last day"), ("7d", "the last 7 days"), ("30d", "the last 30 days")] {
                        option value=(v) selected[since == v] { (l) }
                    }
                }
                button type="submit" { "Show" }
            }
            p.hint { "Workloads on the left, upstreams on the right; a line's width is its requests; red dashed lines are revoked." }
            div.mapbox { (svg) }
        },
    )
}
