//! A PostgreSQL server of a test's own, for the tests that restart it or
//! need TLS on it (the others use the shared server .ci/run starts).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]
#![allow(dead_code)]

use super::free_port;

/// A PostgreSQL server of the test's own (to restart, or with TLS on and
/// only TLS connections accepted over TCP: `hostssl` in `pg_hba.conf`), run the way
/// `.ci/run` runs the tests' server: `initdb` and `pg_ctl` from PATH or
/// `/usr/lib/postgresql/*/bin`, as `nobody` when the test runs as root (initdb
/// refuses root), in a directory under /tmp. Stopped and removed on drop.
pub struct OwnPostgres {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    as_nobody: bool,
    pub port: u16,
}

impl OwnPostgres {
    /// The directory holding `initdb` and `pg_ctl`, as `.ci/run` looks.
    pub fn find_bin() -> Option<std::path::PathBuf> {
        let has_both =
            |d: &std::path::Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
        if let Some(path) = std::env::var_os("PATH")
            && let Some(d) = std::env::split_paths(&path).find(|d| has_both(d))
        {
            return Some(d);
        }
        let mut versions: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|d| has_both(d))
            .collect();
        versions.sort_by_key(|d| {
            let v = d.parent().and_then(|p| p.file_name()).unwrap_or_default();
            v.to_string_lossy().parse::<u32>().unwrap_or(0)
        });
        versions.pop()
    }

    /// `bin/program`, as `nobody` when root.
    fn command(&self, program: &str) -> std::process::Command {
        let exe = self.bin.join(program);
        if self.as_nobody {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "nobody", "--"]).arg(exe);
            c
        } else {
            std::process::Command::new(exe)
        }
    }

    /// `bin/program args` in the server's directory, which must succeed.
    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }

    /// A new server; with `tls`, its certificate for 127.0.0.1 issued by
    /// that CA and TCP connections accepted over TLS only.
    pub fn start(tls: Option<&rcgen::CertifiedIssuer<'static, rcgen::KeyPair>>) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let bin = Self::find_bin().unwrap_or_else(|| {
            panic!(
                "LEASH_TEST_DATABASE_URL is set but initdb/pg_ctl are neither on PATH nor in /usr/lib/postgresql/*/bin: \
                 install PostgreSQL (`apt-get install postgresql`, as .ci/run does) or unset it"
            )
        });
        let id = |args: &[&str]| {
            let out = std::process::Command::new("id")
                .args(args)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u32>()
                .unwrap()
        };
        let as_nobody = id(&["-u"]) == 0;
        let nobody = as_nobody.then(|| id(&["-u", "nobody"]));
        let dir = tempfile::Builder::new()
            .prefix("leash-pg")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path().to_path_buf();
        let own = |path: &std::path::Path| {
            if let Some(uid) = nobody {
                std::os::unix::fs::chown(path, Some(uid), None).unwrap();
            }
        };
        own(&d);
        let port = free_port().port();
        let server = Self {
            dir,
            bin,
            as_nobody,
            port,
        };
        let data = d.join("data").display().to_string();
        server.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
            ],
        );
        let mut options = format!(
            "-p {port} -k {dir} -c listen_addresses=127.0.0.1",
            dir = d.display()
        );
        if let Some(ca) = tls {
            let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "127.0.0.1");
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, ca).unwrap();
            std::fs::write(d.join("server.crt"), cert.pem()).unwrap();
            std::fs::write(d.join("server.key"), key.serialize_pem()).unwrap();
            std::fs::set_permissions(d.join("server.key"), std::fs::Permissions::from_mode(0o600))
                .unwrap();
            own(&d.join("server.crt"));
            own(&d.join("server.key"));
            // Over TCP, TLS or nothing.
            std::fs::write(
                d.join("data/pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .unwrap();
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key",
                dir = d.display()
            ));
        }
        std::fs::write(d.join("options"), &options).unwrap();
        server.pg_ctl("start");
        server
    }

    /// `pg_ctl start|stop|restart`, waiting for it to finish (a fast stop:
    /// clients are disconnected, as in a planned restart).
    pub fn pg_ctl(&self, action: &str) {
        let d = self.dir.path();
        let data = d.join("data").display().to_string();
        let log = d.join("server.log").display().to_string();
        let options = std::fs::read_to_string(d.join("options")).unwrap();
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-w", "-m", "fast", "-o", &options, action,
            ],
        );
    }

    /// The server's `postgres` database, without TLS.
    pub fn plain_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's `postgres` database, TLS verified against `ca_file`.
    pub fn url(&self, sslmode: &str, ca_file: &std::path::Path) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode={sslmode}&sslrootcert={}",
            self.port,
            ca_file.display()
        )
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "stop", "-m", "immediate"])
            .current_dir("/")
            .output();
    }
}
