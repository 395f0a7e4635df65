//! Rebuilds the crate when a migration is added or changed: `sqlx::migrate!`
//! embeds `migrations/` at build time, and cargo does not see new files there.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
