//! A fresh replica set per test: Docker containers by default, `mongod` processes with
//! `MSGBUF_TEST_BACKEND=process`, or an external set with `MSGBUF_TEST_MONGODB_URI`.
//!
//! Docker: testcontainers 0.28 (async runner, default features off: no TLS to the daemon)
//! talks to the daemon's API at `DOCKER_HOST` or `/var/run/docker.sock`; `kill` of a member runs
//! the `docker` CLI (SIGKILL, which the runner has no call for). It needs Docker Engine 20.10+ /
//! API 1.41+ (Debian 12's `docker.io`, Docker Desktop). Measured on Debian 12's 20.10.24 (API
//! 1.41): create, start, logs, pause, unpause, stop, network create and remove all work,
//! although a raw request at bollard's default version is refused ("client version 1.53 is
//! too new. Maximum supported API version is 1.41"): bollard 0.21 joins absolute paths onto
//! its `/v1.53` base URL, which drops the prefix, so the daemon answers at its own version.
//!
//! Networking: a 1-member set runs on a user-defined bridge network ([`TEST_NETWORK`],
//! created by testcontainers) with its port published on a free loopback port, and clients
//! use `directConnection=true`: no host networking (where the daemon cannot create the
//! network, the harness says so and falls back to host networking). A 3-member set uses host
//! networking: members and clients must reach each member at the `host:port` in the set's
//! config.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mongodb::bson::doc;
use mongodb::Client;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

use super::{free_port, mongod_path, wait_for};

/// The bridge network of 1-member container sets.
pub const TEST_NETWORK: &str = "msgbuf-test";

enum Member {
    Container {
        container: Box<ContainerAsync<GenericImage>>,
    },
    Process {
        child: Option<Child>,
        args: Vec<String>,
        _dir: tempfile::TempDir,
    },
}

/// A replica set for one test.
pub struct ReplicaSet {
    pub uri: String,
    /// `host:port` of each member as this process reaches it.
    pub hosts: Vec<String>,
    members: Vec<Member>,
}

/// True (after saying so on stderr) when `rs` is external: the test needs to kill, stop or
/// freeze members, which it cannot do to a set it did not start.
pub fn skip_external(rs: &ReplicaSet, test: &str) -> bool {
    if rs.is_external() {
        eprintln!(
            "SKIPPED {test}: MSGBUF_TEST_MONGODB_URI is an external replica set, and this test must \
             kill, stop or freeze its members; unset it to run the test on a replica set of its own"
        );
    }
    rs.is_external()
}

impl ReplicaSet {
    /// A fresh replica set of `n` members (1 or 3).
    pub async fn start(n: usize) -> ReplicaSet {
        Self::start_with(n, &[]).await
    }

    /// Like [`ReplicaSet::start`], with extra `mongod` arguments (e.g. `--oplogSize 1`).
    pub async fn start_with(n: usize, extra: &[&str]) -> ReplicaSet {
        if let Ok(uri) = std::env::var("MSGBUF_TEST_MONGODB_URI") {
            return ReplicaSet {
                uri,
                hosts: vec![],
                members: vec![],
            };
        }
        let process = std::env::var("MSGBUF_TEST_BACKEND").is_ok_and(|b| b == "process");
        Self::start_backend(n, extra, process).await
    }

    /// A set of `mongod` processes whatever the configured backend (fault tests that need
    /// fail points or signals, and the process backend's self-test).
    pub async fn start_process(n: usize, extra: &[&str]) -> ReplicaSet {
        Self::start_backend(n, extra, true).await
    }

    async fn start_backend(n: usize, extra: &[&str], process: bool) -> ReplicaSet {
        let set = format!("rs{}", free_port());
        if !process && n == 1 {
            if let Some(rs) = Self::start_mapped(&set, extra).await {
                return rs;
            }
        }
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut members = Vec::new();
        for port in &ports {
            let args = mongod_args(&set, &["--bind_ip", "127.0.0.1"], *port, extra);
            members.push(if process {
                start_process(args)
            } else {
                start_container(args, None)
                    .await
                    .expect("start a mongo container")
            });
        }
        let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        msgbuf::mongo::init_replica_set(&hosts, &set, Duration::from_secs(60))
            .await
            .expect("replSetInitiate");
        let uri = format!("mongodb://{}/?replicaSet={set}", hosts.join(","));
        let rs = ReplicaSet {
            uri,
            hosts,
            members,
        };
        rs.wait_for_primary().await;
        rs
    }

    /// One member on the test network, its 27017 mapped to a free loopback port. The set's
    /// config names the member as it sees itself (127.0.0.1:27017); clients connect
    /// directly to the mapped port and never read that name.
    async fn start_mapped(set: &str, extra: &[&str]) -> Option<ReplicaSet> {
        let port = free_port();
        let args = mongod_args(set, &["--bind_ip_all"], 27017, extra);
        let member = match start_container(args, Some(port)).await {
            Ok(member) => member,
            Err(e) => {
                eprintln!("harness: no container on the {TEST_NETWORK} network ({e}); using host networking");
                return None;
            }
        };
        let host = format!("127.0.0.1:{port}");
        let config = doc! {"_id": set, "members": [{"_id": 0, "host": "127.0.0.1:27017"}]};
        wait_for("replSetInitiate", Duration::from_secs(60), || async {
            match direct(&host)
                .await
                .database("admin")
                .run_command(doc! {"replSetInitiate": config.clone()})
                .await
            {
                Ok(_) => Some(()),
                Err(e) if e.to_string().contains("already initialized") => Some(()),
                Err(_) => None,
            }
        })
        .await;
        let rs = ReplicaSet {
            uri: format!("mongodb://{host}/?directConnection=true"),
            hosts: vec![host],
            members: vec![member],
        };
        rs.wait_for_primary().await;
        Some(rs)
    }

    pub fn is_external(&self) -> bool {
        self.members.is_empty()
    }

    pub async fn client(&self) -> Client {
        msgbuf::mongo::connect_replica_set(&self.uri, Duration::from_secs(5))
            .await
            .expect("connect")
    }

    /// Index of the current primary.
    pub async fn wait_for_primary(&self) -> usize {
        wait_for("a PRIMARY", Duration::from_secs(60), || async {
            for (i, host) in self.hosts.iter().enumerate() {
                if let Ok(hello) = direct(host)
                    .await
                    .database("admin")
                    .run_command(doc! {"hello": 1})
                    .await
                {
                    if hello.get_bool("isWritablePrimary").unwrap_or(false) {
                        return Some(i);
                    }
                }
            }
            None
        })
        .await
    }

    /// `kill -9` of member `i`.
    pub fn kill(&mut self, i: usize) {
        match &mut self.members[i] {
            Member::Container { container } => {
                docker_cli(&["kill", "--signal", "KILL", container.id()])
            }
            Member::Process { child, .. } => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }

    /// Clean stop of member `i`.
    pub async fn stop(&mut self, i: usize) {
        match &mut self.members[i] {
            Member::Container { container } => container.stop().await.expect("docker stop"),
            Member::Process { child, .. } => {
                if let Some(mut c) = child.take() {
                    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                    let _ = c.wait();
                }
            }
        }
    }

    /// Freezes member `i` (SIGSTOP, or `docker pause`): connections stay open, nothing answers.
    pub async fn freeze(&self, i: usize) {
        match &self.members[i] {
            Member::Container { container } => container.pause().await.expect("docker pause"),
            Member::Process { child, .. } => signal(child.as_ref(), libc::SIGSTOP),
        }
    }

    /// Undoes [`ReplicaSet::freeze`].
    pub async fn thaw(&self, i: usize) {
        match &self.members[i] {
            Member::Container { container } => container.unpause().await.expect("docker unpause"),
            Member::Process { child, .. } => signal(child.as_ref(), libc::SIGCONT),
        }
    }

    /// Starts member `i` again with its data, and waits until it answers.
    pub async fn restart(&mut self, i: usize) {
        match &mut self.members[i] {
            Member::Container { container } => container.start().await.expect("docker start"),
            Member::Process { child, args, .. } => {
                *child = Some(spawn_mongod(args));
            }
        }
        let host = self.hosts[i].clone();
        wait_for("the member to answer", Duration::from_secs(60), || async {
            direct(&host)
                .await
                .database("admin")
                .run_command(doc! {"ping": 1})
                .await
                .ok()
        })
        .await;
    }

    /// Steps the primary down and waits for a PRIMARY again; returns the new primary's index.
    pub async fn step_down(&self) -> usize {
        let old = self.wait_for_primary().await;
        // The primary closes connections while stepping down: an error here is expected.
        let _ = direct(&self.hosts[old])
            .await
            .database("admin")
            .run_command(doc! {"replSetStepDown": 30, "secondaryCatchUpPeriodSecs": 10})
            .await;
        self.wait_for_primary().await
    }
}

fn mongod_args(set: &str, bind: &[&str], port: u16, extra: &[&str]) -> Vec<String> {
    let port = port.to_string();
    let mut args: Vec<String> = ["--replSet", set]
        .iter()
        .chain(bind)
        .chain(&[
            "--port",
            &port,
            "--wiredTigerCacheSizeGB",
            "0.25",
            "--setParameter",
            "enableTestCommands=1",
        ])
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn signal(child: Option<&Child>, signal: i32) {
    let pid = child.expect("member running").id() as i32;
    assert_eq!(
        unsafe { libc::kill(pid, signal) },
        0,
        "signal {signal} to {pid}"
    );
}

fn docker_cli(args: &[&str]) {
    let status = Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("docker");
    assert!(status.success(), "docker {args:?}: {status}");
}

async fn direct(host: &str) -> Client {
    let mut o =
        mongodb::options::ClientOptions::parse(format!("mongodb://{host}/?directConnection=true"))
            .await
            .expect("options");
    o.server_selection_timeout = Some(Duration::from_millis(1500));
    o.connect_timeout = Some(Duration::from_millis(1500));
    Client::with_options(o).expect("client")
}

/// `mapped`: the loopback port that 27017 is published on, from [`TEST_NETWORK`]; else host
/// networking.
async fn start_container(
    mut args: Vec<String>,
    mapped: Option<u16>,
) -> testcontainers::core::error::Result<Member> {
    let image = std::env::var("MSGBUF_TEST_MONGO_IMAGE").unwrap_or_else(|_| "mongo:7.0".to_owned());
    let (name, tag) = image.rsplit_once(':').unwrap_or((&image, "latest"));
    // The scratch image's entrypoint is mongod itself; the official image's entrypoint
    // prefixes `mongod` to arguments that start with `--`.
    args.extend(["--dbpath".to_owned(), "/data/db".to_owned()]);
    let request = GenericImage::new(name, tag)
        .with_wait_for(WaitFor::message_on_stdout("Waiting for connections"))
        .with_cmd(args);
    let request = match mapped {
        Some(port) => request
            .with_network(TEST_NETWORK)
            .with_mapped_port(port, 27017.tcp()),
        None => request.with_network("host"),
    };
    Ok(Member::Container {
        container: Box::new(request.start().await?),
    })
}

fn spawn_mongod(args: &[String]) -> Child {
    Command::new(mongod_path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("run mongod (scripts/setup-mongod installs it)")
}

fn start_process(mut args: Vec<String>) -> Member {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("db");
    std::fs::create_dir_all(&data).expect("data dir");
    args.extend([
        "--dbpath".to_owned(),
        data.display().to_string(),
        "--logpath".to_owned(),
        dir.path().join("mongod.log").display().to_string(),
    ]);
    let child = spawn_mongod(&args);
    Member::Process {
        child: Some(child),
        args,
        _dir: dir,
    }
}

impl Drop for ReplicaSet {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Member::Process { child: Some(c), .. } = m {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
