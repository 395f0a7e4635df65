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
                            a href="/console/usage" { "Usage" }
                            a href="/console/leaked" { "Leaked" }
                            a href="/console/stripped" { "Stripped" }
                            a href="/console/missions" { "Missions" }
                            @if s.caller.role >= Role::Admin {
                                a href="/console/audit" { "Audit" }
                                a href="/console/tokens" { "Tokens" }
                            }
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
            (since_form("/console/map", since))
            p.hint { "Workloads on the left, upstreams on the right; a line's width is its requests; red dashed lines are revoked." }
            div.mapbox { (svg) }
        },
    )
}

pub fn leaked(s: &Signed, list: &crate::admin::types::LeakedList) -> Markup {
    layout(
        "Leaked values",
        Some(s),
        html! {
            h1 { "Leaked values" }
            p.hint { "Registered leaked values are refused by every sidecar wherever they appear. Only a keyed fingerprint is kept; the value is never shown." }
            table #leaked {
                thead { tr { th { "Seq" } th { "Fingerprint" } th { "Why" } th { "By" } th { "When" } th { "State" } } }
                tbody {
                    @for r in &list.leaked {
                        tr {
                            td { a href={ "/console/leaked/" (r.id) } { (r.seq) } }
                            td.id { (r.fingerprint_id.as_deref().unwrap_or("-")) }
                            td { (r.reason) }
                            td.id { (r.revoked_by) }
                            td { (when(r.revoked_at_ms)) }
                            td { @if r.active { "refused" } @else { "restored" } }
                        }
                    }
                }
            }
        },
    )
}

pub fn leaked_status(s: &Signed, st: &crate::admin::types::LeakedStatus) -> Markup {
    let r = &st.revocation;
    layout(
        "Leaked value",
        Some(s),
        html! {
            h1 { "Leaked value " (r.fingerprint_id.as_deref().unwrap_or("")) }
            dl.facts {
                dt { "Id" } dd.id { (r.id) }
                dt { "Why" } dd { (r.reason) }
                dt { "By" } dd.id { (r.revoked_by) " · " (when(r.revoked_at_ms)) }
                dt { "Propagation" } dd { (st.propagation.acknowledged.len()) " acknowledged, " (st.propagation.pending.len()) " pending" }
            }
            h2 { "Sightings: who still sends it" }
            @if st.sightings.is_empty() {
                p #no-sightings { "No sidecar has seen it since it was registered." }
            } @else {
                table #sightings {
                    thead { tr { th { "Workload" } th { "Upstream" } th { "Host" } th { "Where" } th { "Times" } th { "Last seen" } } }
                    tbody {
                        @for x in &st.sightings {
                            tr { td.id { (x.workload) } td { (x.upstream) } td.id { (x.host) } td { (x.location) } td { (x.count) } td { (when(x.last_seen_ms)) } }
                        }
                    }
                }
            }
        },
    )
}

pub fn stripped(s: &Signed, r: &crate::admin::types::StrippedReport) -> Markup {
    layout(
        "Stripped credentials",
        Some(s),
        html! {
            h1 { "Stripped credentials" }
            p.hint { "Workloads that sent a credential of their own to a managed upstream: the sidecar removed it and injected Leash's. Each is a consumer still holding a long-lived secret." }
            table #stripped {
                thead { tr { th { "Workload" } th { "Upstream" } th { "Times" } th { "First seen" } th { "Last seen" } } }
                tbody {
                    @for x in &r.stripped {
                        tr { td.id { (x.workload) } td { (x.upstream) } td { (x.count) } td { (when(x.first_seen_ms)) } td { (when(x.last_seen_ms)) } }
                    }
                }
            }
            h2 { "Echoed back by upstreams" }
            table #echoed {
                thead { tr { th { "Workload" } th { "Upstream" } th { "Header" } th { "Times" } th { "Last seen" } } }
                tbody {
                    @for x in &r.echoed {
                        tr { td.id { (x.workload) } td { (x.upstream) } td.id { (x.header) } td { (x.count) } td { (when(x.last_seen_ms)) } }
                    }
                }
            }
        },
    )
}

pub fn audit(
    s: &Signed,
    log: &crate::admin::types::AuditLog,
    verdict: Option<&crate::admin::types::AuditVerdict>,
) -> Markup {
    layout(
        "Audit log",
        Some(s),
        html! {
            h1 { "Audit log" }
            @if let Some(v) = verdict {
                p #verdict class=(if v.ok { "ok" } else { "error" }) {
                    @if v.ok {
                        "The chain verifies: " (v.chained) " chained entries, head " span.id { (v.head.as_deref().unwrap_or("-")) } "."
                    } @else {
                        "The chain is broken at entry " (v.first_bad_id.unwrap_or(0)) ": " (v.problem.as_deref().unwrap_or(""))
                    }
                }
            } @else {
                p { a #verify href="/console/audit?verify=true" { "Verify the chain" } }
            }
            table #audit {
                thead { tr { th { "When" } th { "Who" } th { "Action" } th { "Status" } th { "Detail" } } }
                tbody {
                    @for e in &log.entries {
                        tr { td { (when(e.at_ms)) } td.id { (e.actor) " (" (e.role) ")" } td.id { (e.action) } td { (e.status) } td { (e.detail) } }
                    }
                }
            }
        },
    )
}

pub fn missions(s: &Signed, list: &crate::admin::types::MissionList) -> Markup {
    layout(
        "Missions",
        Some(s),
        html! {
            h1 { "Remediation missions" }
            table #missions {
                thead { tr { th { "Objective" } th { "Owner" } th { "State" } th { "Criteria holding" } th { "Deadline" } } }
                tbody {
                    @for m in &list.missions {
                        tr class=(if m.overdue { "stale" } else { "" }) {
                            td { a href={ "/console/missions/" (m.id) } { (m.objective) } }
                            td.id { (m.owner) }
                            td { (m.state) @if m.overdue { " · overdue" } }
                            td { (m.criteria_holding) " / " (m.criteria) }
                            td { @if let Some(d) = m.deadline_ms { (when_or_in(d)) } @else { "-" } }
                        }
                    }
                }
            }
        },
    )
}

fn when_or_in(ms: i64) -> String {
    let now = crate::store::now_ms();
    if ms > now {
        format!("in {} h", (ms - now) / 3_600_000)
    } else {
        when(ms)
    }
}

pub fn mission(s: &Signed, m: &crate::admin::types::MissionView) -> Markup {
    layout(
        "Mission",
        Some(s),
        html! {
            h1 { (m.objective) }
            dl.facts {
                dt { "State" } dd #mission-state { (m.state) @if m.overdue { " · overdue" } @if m.closed_by_hand { " (closed by hand)" } }
                dt { "Owner" } dd.id { (m.owner) }
                dt { "Criteria" } dd { @if m.all_hold { "all hold" } @else { "not all hold yet" } }
            }
            p { a #evidence href={ "/console/missions/" (m.id) "/evidence" } { "Download the signed evidence (JWS)" } }
            h2 { "Criteria" }
            table #criteria {
                thead { tr { th { "Finding" } th { "Criterion" } th { "Holds" } th { "Why" } } }
                tbody {
                    @for c in &m.criteria {
                        tr class=(if c.holds { "" } else { "stale" }) { td { (c.finding) } td { (c.criterion) } td { @if c.holds { "yes" } @else { "no" } } td { (c.detail) } }
                    }
                }
            }
            h2 { "Findings" }
            ul { @for f in &m.findings { li.id { (f.seq) ": " (serde_json::to_string(&f.finding).unwrap_or_default()) } } }
            h2 { "History" }
            ul { @for c in &m.changes { li { (when(c.at_ms)) ": " (c.state) " by " span.id { (c.actor) } " — " (c.reason) } } }
        },
    )
}

const SINCE: [(&str, &str); 4] = [
    ("1h", "the last hour"),
    ("1d", "the last day"),
    ("7d", "the last 7 days"),
    ("30d", "the last 30 days"),
];

fn since_form(action: &str, since: &str) -> Markup {
    html! {
        form.inline method="get" action=(action) {
            label for="since" { "Used since" }
            select #since name="since" {
                @for (v, l) in SINCE {
                    option value=(v) selected[since == v] { (l) }
                }
            }
            button type="submit" { "Show" }
        }
    }
}

/// Requests over time as bars (errors in red on top of each).
pub fn usage(s: &Signed, since: &str, t: &crate::usage::Timeline) -> Markup {
    const W: f64 = 900.0;
    const H: f64 = 220.0;
    let steps = ((t.until_ms - t.since_ms) / t.step_ms.max(1)).max(1);
    let bar = W / steps as f64;
    let max = t
        .points
        .iter()
        .map(|p| p.requests)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let x = |at: i64| (at - t.since_ms) as f64 / t.step_ms.max(1) as f64 * bar;
    let total: i64 = t.points.iter().map(|p| p.requests).sum();
    let errors: i64 = t.points.iter().map(|p| p.errors).sum();
    layout(
        "Usage",
        Some(s),
        html! {
            h1 { "Usage over time" }
            (since_form("/console/usage", since))
            p #usage-total { (total) " request(s), " (errors) " error(s); one bar per " (t.step_ms / 60_000) " min." }
            div.mapbox {
                svg.chart viewBox={ "0 0 " (W) " " (H + 20.0) } role="img" aria-label="Requests over time" {
                    line.axis x1="0" y1=(H) x2=(W) y2=(H) {}
                    @for p in &t.points {
                        @let h = H * p.requests as f64 / max;
                        @let e = H * p.errors as f64 / max;
                        rect.bar x=(format!("{:.1}", x(p.at_ms))) y=(format!("{:.1}", H - h)) width=(format!("{:.1}", (bar - 1.0).max(1.0))) height=(format!("{h:.1}")) {
                            title { (p.requests) " request(s), " (p.errors) " error(s)" }
                        }
                        @if p.errors > 0 {
                            rect.errors x=(format!("{:.1}", x(p.at_ms))) y=(format!("{:.1}", H - e)) width=(format!("{:.1}", (bar - 1.0).max(1.0))) height=(format!("{e:.1}")) {}
                        }
                    }
                    text.label x="0" y=(H + 15.0) { (when(t.since_ms)) }
                    text.label x=(W) y=(H + 15.0) text-anchor="end" { "now" }
                }
            }
        },
    )
}

/// The token form, and a token just made: shown this once (the store keeps
/// only its hash), never again on any page.
pub fn tokens(
    s: &Signed,
    created: Option<&crate::admin::types::TokenCreated>,
    error: Option<&str>,
) -> Markup {
    layout(
        "Tokens",
        Some(s),
        html! {
            h1 { "Admin API tokens" }
            @if let Some(t) = created {
                div.card #created {
                    p { "Token " strong { (t.name) } " (" (t.role) "). Copy it now: it is shown this once and cannot be read again." }
                    input #new-token readonly value=(t.token);
                }
            }
            form.card method="post" action="/console/tokens" {
                input type="hidden" name="csrf" value=(s.csrf);
                label for="name" { "Name" }
                input #name name="name" required maxlength="64";
                label for="role" { "Role" }
                select #role name="role" {
                    option value="viewer" { "viewer: read" }
                    option value="responder" { "responder: also revoke and restore" }
                    option value="admin" { "admin: also tokens, secrets, the audit log" }
                }
                @if let Some(e) = error { p.error #tokens-error { (e) } }
                button type="submit" { "Create" }
            }
        },
    )
}
