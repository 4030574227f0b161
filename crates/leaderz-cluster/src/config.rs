//! The node's configuration files: containerd, CNI, kubelet. Pure functions of the layout,
//! so the settings that matter (see `shared/NODE.md`) are checked by unit tests.

use std::net::Ipv4Addr;

use serde_json::json;

/// The node's name, as `kubectl get nodes` shows it.
pub const NODE_NAME: &str = "leaderz-node";
/// The node's address (on `lo` inside its network namespace): kube-apiserver advertises
/// it, so the `kubernetes` Service's endpoint is this address.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The pods' subnet, on the bridge `cni0` inside the node's network namespace. The bridge
/// has no uplink: pods reach the node and each other, nothing else.
pub const POD_SUBNET: &str = "10.77.1.0/24";
/// The Services' range; its first address is the `kubernetes` Service's.
pub const SERVICE_RANGE: &str = "10.77.2.0/24";
/// The `kubernetes` Service's address (the first of [`SERVICE_RANGE`]).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 1);
/// containerd's socket inside the node's mount namespace.
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";

/// What the configuration files refer to.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// Where the CNI configuration lives (a host path, also visible in the node).
    pub(crate) cni_conf_dir: String,
    /// containerd's image for pod sandboxes.
    pub(crate) sandbox_image: String,
    /// The kubelet's `cgroupRoot`.
    pub(crate) cgroup_root: String,
    /// The client CA the kubelet trusts (the API server's kubelet client cert).
    pub(crate) client_ca_file: String,
}

/// Quotes a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// containerd's `config.toml` (version 2, containerd 1.6): its own root, state and socket
/// (in the node's private `/var/lib` and `/run`), the local sandbox image, and the settings
/// these VMs need (`restrict_oom_score_adj`: no `CAP_SYS_RESOURCE` here).
pub(crate) fn containerd_toml(layout: &Layout) -> String {
    format!(
        r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {sandbox}
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = {cni}
    max_conf_num = 1
"#,
        socket = toml_string(CONTAINERD_SOCKET),
        ttrpc = toml_string(&format!("{CONTAINERD_SOCKET}.ttrpc")),
        sandbox = toml_string(&layout.sandbox_image),
        cni = toml_string(&layout.cni_conf_dir),
    )
}

/// The pod network: a bridge with host-local addresses from [`POD_SUBNET`], the node as
/// the gateway, no masquerading (there is nowhere to masquerade to).
pub(crate) fn cni_conflist() -> String {
    json!({
        "cniVersion": "0.4.0",
        "name": "leaderz-pods",
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": POD_SUBNET }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
            },
        }],
    })
    .to_string()
}

/// The `KubeletConfiguration` (JSON is YAML). cgroupfs driver under a per-run root, cgroup
/// v1 allowed (these VMs), swap tolerated, webhook authn/authz, no host `resolv.conf` for
/// pods, and eviction and image GC loose enough for a shared disk and memory.
pub(crate) fn kubelet_config(layout: &Layout) -> String {
    json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": "0.0.0.0",
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": { "enabled": false },
            "webhook": { "enabled": true },
            "x509": { "clientCAFile": layout.client_ca_file },
        },
        "authorization": { "mode": "Webhook" },
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": layout.cgroup_root,
        "failSwapOn": false,
        "failCgroupV1": false,
        "containerRuntimeEndpoint": format!("unix://{CONTAINERD_SOCKET}"),
        "resolvConf": "",
        "clusterDomain": "cluster.local",
        "serializeImagePulls": false,
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            cni_conf_dir: "/tmp/x/cni".to_owned(),
            sandbox_image: "localhost/leaderz-pause:0.1.0".to_owned(),
            cgroup_root: "/leaderz-node-1-2-3".to_owned(),
            client_ca_file: "/tmp/x/client-ca.crt".to_owned(),
        }
    }

    #[test]
    fn containerd_has_the_settings_these_machines_need() {
        let toml = containerd_toml(&layout());
        for needed in [
            r#"sandbox_image = "localhost/leaderz-pause:0.1.0""#,
            "restrict_oom_score_adj = true",
            "netns_mounts_under_state_dir = true",
            "SystemdCgroup = false",
            r#"conf_dir = "/tmp/x/cni""#,
            r#"address = "/run/containerd/containerd.sock""#,
        ] {
            assert!(toml.contains(needed), "{needed} missing from\n{toml}");
        }
    }

    #[test]
    fn kubelet_runs_cgroupfs_under_its_own_root_on_cgroup_v1() {
        let config: serde_json::Value = serde_json::from_str(&kubelet_config(&layout())).unwrap();
        assert_eq!(config["cgroupDriver"], "cgroupfs");
        assert_eq!(config["cgroupRoot"], "/leaderz-node-1-2-3");
        assert_eq!(config["failCgroupV1"], false);
        assert_eq!(config["failSwapOn"], false);
        assert_eq!(config["resolvConf"], "");
        assert_eq!(config["authentication"]["anonymous"]["enabled"], false);
    }

    #[test]
    fn pod_network_has_no_masquerade_and_the_node_as_gateway() {
        let conf: serde_json::Value = serde_json::from_str(&cni_conflist()).unwrap();
        let bridge = &conf["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], POD_SUBNET);
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    #[test]
    fn the_kubernetes_service_ip_is_the_first_of_the_range() {
        let (network, _) = SERVICE_RANGE.split_once('/').unwrap();
        let network: Ipv4Addr = network.parse().unwrap();
        assert_eq!(u32::from(network) + 1, u32::from(KUBERNETES_SERVICE_IP));
    }
}
