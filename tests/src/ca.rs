//! A `tern-control` CA in-process, for tests of proxies that get their certificates from it:
//! a state directory of its own, tokens written to files, and the `identity: ca:` block of
//! a proxy config. It can be stopped and started again on the same port and state, to play
//! a control plane that dies and comes back.

use std::net::SocketAddr;
use std::time::Duration;

use controlplane::{CaOptions, ConfigSource, ControlPlane, Options};

use crate::pki::TempDir;

/// The trust domain of test meshes.
pub const TRUST_DOMAIN: &str = "mesh.test";

/// A control plane serving the CA on loopback.
pub struct TestControlPlane {
    /// Its state directory (root, token key) and token files.
    pub dir: TempDir,
    /// Where it listens (kept across restarts).
    pub address: SocketAddr,
    /// The CA's options; change them and [`Self::restart`] to rotate roots.
    pub ca: CaOptions,
    /// Where to serve config from (set before [`Self::restart`]).
    pub source: ConfigSource,
    /// The admin address (kept across restarts).
    pub admin: SocketAddr,
    /// The sidecar injector's webhook, if it serves one (set before [`Self::restart`]).
    pub injector: Option<controlplane::webhook::Injector>,
    running: Option<ControlPlane>,
}

impl TestControlPlane {
    /// Starts a CA issuing certificates valid for `lifetime`.
    pub fn start(lifetime: Duration) -> TestControlPlane {
        let dir = TempDir::new("control");
        let ca = CaOptions {
            state_dir: dir.0.join("state"),
            trust_domain: TRUST_DOMAIN.into(),
            workload_lifetime: lifetime,
            ca_cert: None,
            ca_key: None,
            extra_roots: None,
        };
        let mut control = TestControlPlane {
            dir,
            address: "127.0.0.1:0".parse().unwrap(),
            ca,
            source: ConfigSource::None,
            admin: "127.0.0.1:0".parse().unwrap(),
            injector: None,
            running: None,
        };
        control.restart();
        control
    }

    /// Starts a CA and config server reading `manifests`.
    pub fn with_manifests(lifetime: Duration, manifests: &std::path::Path) -> TestControlPlane {
        TestControlPlane::with_source(lifetime, ConfigSource::Directory(manifests.to_owned()))
    }

    /// Starts a CA and config server reading `source`.
    pub fn with_source(lifetime: Duration, source: ConfigSource) -> TestControlPlane {
        let mut control = TestControlPlane::start(lifetime);
        control.source = source;
        control.restart();
        control
    }

    /// The running control plane.
    pub fn running(&self) -> &ControlPlane {
        self.running.as_ref().expect("the control plane is running")
    }

    fn options(&self) -> Options {
        Options {
            listen: self.address,
            server_names: vec!["tern-control".into()],
            ca: self.ca.clone(),
            source: self.source.clone(),
            admin: Some(self.admin),
            injector: self.injector.clone(),
        }
    }

    /// Stops serving (the port closes; proxies' requests fail).
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop();
        }
    }

    /// Starts (again) on the same port with the same root.
    pub fn restart(&mut self) {
        self.try_restart().expect("control plane starts");
    }

    /// [`Self::restart`], saying why it could not start.
    pub fn try_restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let running = ControlPlane::start(self.options())?;
        self.address = running.address();
        if let Some(admin) = running.admin_address() {
            self.admin = admin;
        }
        self.running = Some(running);
        Ok(())
    }

    /// The SPIFFE ID of a test workload.
    pub fn spiffe_id(name: &str) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{name}")
    }

    /// Writes `name`'s bootstrap token (valid for a day) to a file and returns its path.
    pub fn write_token(&self, name: &str, proves: &str) -> std::path::PathBuf {
        self.write_token_valid_for(name, proves, controlplane::DEFAULT_TOKEN_VALIDITY)
    }

    /// Writes `name`'s bootstrap token, valid for `valid_for`, to a file and returns its path.
    pub fn write_token_valid_for(
        &self,
        name: &str,
        proves: &str,
        valid_for: Duration,
    ) -> std::path::PathBuf {
        // The CA's state directory is enough to mint a token, running or not.
        let authority = controlplane::Authority::open(&self.options().ca).unwrap();
        let token = authority.token(&Self::spiffe_id(proves).parse().unwrap(), valid_for);
        let path = self.dir.0.join(format!("{name}.token"));
        std::fs::write(&path, token).unwrap();
        path
    }

    /// The `identity:` block for a proxy that is `name`, with a token that proves `proves`.
    /// The proxy verifies the CA's serving certificate against the CA's current signing
    /// certificate.
    pub fn identity_yaml(&self, name: &str, proves: &str) -> String {
        self.identity_yaml_with(name, &self.write_token(name, proves))
    }

    /// The `identity:` block for a proxy that is `name`, with the token in `token`.
    pub fn identity_yaml_with(&self, name: &str, token: &std::path::Path) -> String {
        let root = self
            .ca
            .ca_cert
            .clone()
            .unwrap_or_else(|| self.dir.0.join("state/ca.crt"));
        format!(
            "identity:\n  ca:\n    address: {}\n    root: {}\n    spiffe_id: {}\n    token_file: {}\n",
            self.address,
            root.display(),
            Self::spiffe_id(name),
            token.display()
        )
    }
}

/// A proxy's config for Pod `pod` (namespace `default`) that gets the rest from
/// `tern-control`: `identity` (an `identity:` block), and with `outbound_to`
/// (`service.namespace`) a listener on loopback for that Service's port 80.
pub fn discovery_yaml(identity: &str, pod: &str, outbound_to: Option<&str>) -> String {
    let outbound = match outbound_to {
        Some(service) => format!("[{{ service: {service}, port: 80, listen: 127.0.0.1:0 }}]"),
        None => "[]".to_owned(),
    };
    format!(
        "{identity}discovery:\n  workload: {{ namespace: default, name: {pod} }}\n  outbound: {outbound}\n"
    )
}

impl Drop for TestControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}
