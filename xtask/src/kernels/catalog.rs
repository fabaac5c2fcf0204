//! The kernels of the matrix: Debian's cloud kernel packages that `scripts/setup.sh`
//! downloaded into the cache (one per suite), unpacked with `dpkg-deb -x` (never
//! installed) and given a `modules.dep` by busybox's depmod.

use std::{
    collections::{BTreeSet, VecDeque},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::workspace;

/// The suites whose cloud kernel the matrix boots, oldest first, with the kernel series
/// they carry (for messages; the release comes from the package itself).
pub const SUITES: [(&str, &str); 3] = [
    ("bullseye", "5.10"),
    ("bookworm", "6.1"),
    ("bookworm-backports", "6.12"),
];

/// First kernel with tcx (`BPF_TCX_INGRESS`/`EGRESS` links).
pub const TCX_SINCE: (u32, u32) = (6, 6);

/// Kernel module directories copied into the guest (with whatever they depend on): the
/// devices the testbed makes (veth, dummy, bridge, vxlan), tc's clsact and cls_bpf, and
/// netfilter for the Docker-like iptables rules and conntrack.
const MODULE_DIRS: [&str; 8] = [
    "kernel/net/netfilter/",
    "kernel/net/ipv4/netfilter/",
    "kernel/net/ipv6/netfilter/",
    "kernel/net/bridge/",
    "kernel/net/sched/",
    "kernel/drivers/net/veth.",
    "kernel/drivers/net/dummy.",
    "kernel/drivers/net/vxlan",
];

/// Modules init loads up front (the kernel would also load most of them on demand
/// through modprobe; loading them first makes a missing one visible in the report).
pub const PRELOAD: [&str; 17] = [
    // iptables-nft counts every rule: a module of its own in 5.10, built in later.
    "nft_counter",
    "veth",
    "dummy",
    "bridge",
    "br_netfilter",
    "vxlan",
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "xt_conntrack",
    "xt_addrtype",
    "xt_MASQUERADE",
];

/// One kernel, unpacked.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub suite: String,
    /// `uname -r`, e.g. `6.1.0-50-cloud-amd64`.
    pub release: String,
    /// (major, minor) of the release.
    pub version: (u32, u32),
    /// The unpacked package's root (`boot/vmlinuz-*`, `lib/modules/<release>/`).
    pub root: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    pub fn has_tcx(&self) -> bool {
        self.version >= TCX_SINCE
    }

    /// `major.minor`, as the matrix prints it.
    pub fn series(&self) -> String {
        format!("{}.{}", self.version.0, self.version.1)
    }

    /// The modules of [`PRELOAD`] this kernel has as modules (the others are built in).
    pub fn preload(&self, wanted: &[String]) -> Vec<String> {
        PRELOAD
            .iter()
            .filter(|m| {
                wanted.iter().any(|w| {
                    w.rsplit('/')
                        .next()
                        .and_then(|f| f.split('.').next())
                        .is_some_and(|stem| stem == **m)
                })
            })
            .map(|m| (*m).to_owned())
            .collect()
    }

    /// The module files (relative to [`Kernel::modules_dir`]) of [`MODULE_DIRS`] plus
    /// everything they depend on, by the `modules.dep` depmod wrote.
    pub fn wanted_modules(&self) -> anyhow::Result<Vec<String>> {
        let dep_path = self.modules_dir().join("modules.dep");
        let text = std::fs::read_to_string(&dep_path)
            .with_context(|| format!("reading {}", dep_path.display()))?;
        Ok(closure(&text))
    }
}

/// The modules of `modules_dep` under [`MODULE_DIRS`] and, transitively, their
/// dependencies, sorted.
fn closure(modules_dep: &str) -> Vec<String> {
    let deps = parse_modules_dep(modules_dep);
    let mut queue: VecDeque<&str> = deps
        .iter()
        .map(|(m, _)| m.as_str())
        .filter(|m| MODULE_DIRS.iter().any(|d| m.starts_with(d)))
        .collect();
    let mut seen = BTreeSet::new();
    while let Some(m) = queue.pop_front() {
        if !seen.insert(m.to_owned()) {
            continue;
        }
        if let Some((_, ds)) = deps.iter().find(|(name, _)| name == m) {
            queue.extend(ds.iter().map(String::as_str));
        }
    }
    seen.into_iter().collect()
}

/// `modules.dep` lines: `path.ko: dep1.ko dep2.ko`.
fn parse_modules_dep(text: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let (m, ds) = l.split_once(':')?;
            Some((
                m.trim().to_owned(),
                ds.split_whitespace().map(str::to_owned).collect(),
            ))
        })
        .collect()
}

/// `linux-image-6.1.0-50-cloud-amd64_6.1.176-1_amd64.deb` -> `6.1.0-50-cloud-amd64`.
fn release_of_deb(file_name: &str) -> Option<String> {
    let rest = file_name.strip_prefix("linux-image-")?;
    let (release, _) = rest.split_once('_')?;
    Some(release.to_owned())
}

/// `6.12.95+deb12-cloud-amd64` -> (6, 12).
fn version_of_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The package of `suite` in the cache, or what to do when it is missing.
fn deb_of(cache: &Path, suite: &str) -> anyhow::Result<PathBuf> {
    let dir = cache.join("debs").join(suite);
    let debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "deb"))
                .collect()
        })
        .unwrap_or_default();
    match debs.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no kernel package for {suite} in {} (run `cargo xtask setup`, which downloads it)",
            dir.display()
        ),
        _ => bail!(
            "more than one kernel package in {}: keep one",
            dir.display()
        ),
    }
}

/// Unpacks (once) the kernels of `suites` from the cache and gives each a `modules.dep`.
pub fn prepare(cache: &Path, suites: &[&str]) -> anyhow::Result<Vec<Kernel>> {
    let mut kernels = Vec::new();
    for suite in suites {
        let deb = deb_of(cache, suite)?;
        let name = deb
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let release = release_of_deb(&name)
            .with_context(|| format!("{}: not a linux-image package", deb.display()))?;
        let version = version_of_release(&release)
            .with_context(|| format!("no version in kernel release {release:?}"))?;
        let root = cache.join("unpacked").join(&release);
        let done = root.join(".unpacked");
        if !done.exists() {
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root)?;
            workspace::run_status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
            // No kmod on the host: busybox's depmod writes modules.dep (and .alias, which
            // the kernel's on-demand modprobe uses) into the unpacked tree.
            workspace::run_status(
                Command::new("busybox")
                    .args(["depmod", "-b"])
                    .arg(&root)
                    .arg(&release),
            )?;
            std::fs::write(&done, "")?;
        }
        kernels.push(Kernel {
            suite: (*suite).to_owned(),
            release,
            version,
            root,
        });
    }
    Ok(kernels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions() {
        assert_eq!(
            release_of_deb("linux-image-6.12.95+deb12-cloud-amd64_6.12.95-1~bpo12+1_amd64.deb")
                .as_deref(),
            Some("6.12.95+deb12-cloud-amd64")
        );
        assert_eq!(release_of_deb("busybox_1.35_amd64.deb"), None);
        assert_eq!(
            version_of_release("6.12.95+deb12-cloud-amd64"),
            Some((6, 12))
        );
        assert_eq!(version_of_release("5.10.0-32-cloud-amd64"), Some((5, 10)));
        assert!((6, 1) < TCX_SINCE && (6, 12) >= TCX_SINCE);
    }

    #[test]
    fn module_closure_follows_dependencies() {
        let dep = "kernel/net/sched/cls_bpf.ko:\n\
                   kernel/net/netfilter/nft_compat.ko: kernel/net/netfilter/x_tables.ko kernel/lib/libcrc32c.ko\n\
                   kernel/net/netfilter/x_tables.ko:\n\
                   kernel/lib/libcrc32c.ko:\n\
                   kernel/fs/ext4/ext4.ko: kernel/lib/libcrc32c.ko\n";
        assert_eq!(
            closure(dep),
            [
                "kernel/lib/libcrc32c.ko",
                "kernel/net/netfilter/nft_compat.ko",
                "kernel/net/netfilter/x_tables.ko",
                "kernel/net/sched/cls_bpf.ko",
            ]
        );
    }
}
