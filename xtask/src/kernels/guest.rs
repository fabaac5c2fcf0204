//! The guest's initramfs: busybox, the host's own network tools with their libraries
//! (`ldd`), the kernel's modules, the test binaries, and an init script that runs the
//! suites and reports on the results port (the VM's second serial line, `/dev/ttyS1`).
//!
//! Files keep their host paths (libraries at the paths `ldd` names, so the dynamic loader
//! finds them as on the host); the host's tools go to `/usr/local/sbin`, ahead of
//! busybox's applets in `PATH`, and the test binaries to `/xh`.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::{catalog::Kernel, results::MARKER};

/// Where the guest finds the test binaries.
pub const BIN_DIR: &str = "/xh";

/// Host tools the testbed shells out to, and whether the guest cannot do without them
/// (`iptables` is whatever backend the host's alternative selects; the testbed checks
/// it inside the guest as it does on the host).
const TOOLS: [(&str, bool); 12] = [
    ("ip", true),
    ("tc", true),
    ("ping", true),
    ("iptables", true),
    ("iptables-restore", true),
    ("iptables-save", true),
    ("conntrack", true),
    ("bpftool", true),
    ("nsenter", true),
    ("sysctl", true),
    ("ethtool", false),
    ("ss", false),
];

/// Where iptables looks for its match and target extensions (dlopen'ed, so `ldd` of
/// the binary does not list them).
const XTABLES_DIRS: [&str; 2] = ["/usr/lib/x86_64-linux-gnu/xtables", "/usr/lib/xtables"];

/// Small files some tools read (protocol and service names).
const ETC_FILES: [&str; 3] = ["/etc/protocols", "/etc/services", "/etc/ethertypes"];

/// One test run inside the guest: `argv` (absolute paths) with extra environment.
#[derive(Clone, Debug)]
pub struct Run {
    pub suite: String,
    pub attach: String,
    pub env: Vec<(String, String)>,
    pub argv: Vec<String>,
}

/// A directory laid out as the guest's root, turned into a cpio archive at the end.
pub struct Tree {
    root: PathBuf,
    libs: BTreeSet<PathBuf>,
}

impl Tree {
    pub fn new(root: PathBuf) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Self {
            root,
            libs: BTreeSet::new(),
        })
    }

    fn at(&self, guest_path: &Path) -> PathBuf {
        self.root
            .join(guest_path.strip_prefix("/").unwrap_or(guest_path))
    }

    /// Copies the host file `src` (symlinks followed) to `guest_path`, executable bits
    /// kept.
    fn copy(&self, src: &Path, guest_path: &Path) -> anyhow::Result<()> {
        let dst = self.at(guest_path);
        if let Some(dir) = dst.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::copy(src, &dst)
            .with_context(|| format!("copying {} into the initramfs", src.display()))?;
        Ok(())
    }

    /// Copies a program or shared object and remembers the libraries it needs.
    fn copy_elf(&mut self, src: &Path, guest_path: &Path) -> anyhow::Result<()> {
        self.copy(src, guest_path)?;
        self.libs.extend(ldd(src)?);
        Ok(())
    }

    fn symlink(&self, target: &str, guest_path: &Path) -> anyhow::Result<()> {
        let dst = self.at(guest_path);
        if let Some(dir) = dst.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(&dst);
        std::os::unix::fs::symlink(target, &dst)
            .with_context(|| format!("symlink {}", dst.display()))
    }

    fn write(&self, guest_path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let dst = self.at(guest_path);
        if let Some(dir) = dst.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&dst, text)?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    /// Busybox, the host's tools with iptables' extensions, a few /etc files and the
    /// test binaries (`(name, host path)`, installed as `/xh/<name>`).
    pub fn add_userland(&mut self, binaries: &[(&str, &Path)]) -> anyhow::Result<()> {
        let busybox =
            find_tool("busybox").context("busybox not found (apt-get install busybox-static)")?;
        self.copy_elf(&busybox, Path::new("/bin/busybox"))?;
        for dir in ["proc", "sys", "dev", "tmp", "run", "root", "var", "etc"] {
            std::fs::create_dir_all(self.root.join(dir))?;
        }
        // iproute2's `ip netns` keeps its mounts under /var/run/netns.
        self.symlink("../run", Path::new("/var/run"))?;
        for (tool, required) in TOOLS {
            let Some(path) = find_tool(tool) else {
                if required {
                    bail!("{tool} not found on this machine: run `cargo xtask setup`");
                }
                continue;
            };
            let real = path
                .canonicalize()
                .with_context(|| format!("resolving {}", path.display()))?;
            let real_name = file_name(&real)?;
            let dest = Path::new("/usr/local/sbin").join(&real_name);
            if !self.at(&dest).exists() {
                self.copy_elf(&real, &dest)?;
            }
            // Multi-call binaries (xtables-nft-multi) go by the name they are called.
            if real_name != tool {
                self.symlink(&real_name, &Path::new("/usr/local/sbin").join(tool))?;
            }
        }
        for dir in XTABLES_DIRS.map(Path::new).iter().filter(|d| d.is_dir()) {
            for entry in std::fs::read_dir(dir)? {
                let path = entry?.path();
                if path.extension().is_some_and(|x| x == "so") {
                    self.copy_elf(&path, &path)?;
                }
            }
        }
        for f in ETC_FILES.map(Path::new).iter().filter(|f| f.is_file()) {
            self.copy(f, f)?;
        }
        self.write(
            Path::new("/etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\n",
            0o644,
        )?;
        self.write(Path::new("/etc/group"), "root:x:0:\n", 0o644)?;
        for (name, path) in binaries {
            self.copy_elf(path, &Path::new(BIN_DIR).join(name))?;
        }
        let libs = std::mem::take(&mut self.libs);
        for lib in &libs {
            self.copy(lib, lib)?;
        }
        Ok(())
    }

    /// The kernel's modules for the testbed (see [`Kernel::wanted_modules`]) with the
    /// `modules.*` indexes busybox's modprobe reads.
    /// Returns the modules init is to load up front.
    pub fn add_modules(&mut self, kernel: &Kernel) -> anyhow::Result<Vec<String>> {
        let src = kernel.modules_dir();
        let guest = Path::new("/lib/modules").join(&kernel.release);
        let wanted = kernel.wanted_modules()?;
        for m in &wanted {
            self.copy(&src.join(m), &guest.join(m))?;
        }
        for entry in std::fs::read_dir(&src)? {
            let path = entry?.path();
            let name = file_name(&path)?;
            if name.starts_with("modules.") && path.is_file() {
                self.copy(&path, &guest.join(&name))?;
            }
        }
        Ok(kernel.preload(&wanted))
    }

    /// The init script: mounts, modules, then each run with its output on the results
    /// port between marker lines, then power off.
    pub fn add_init(&self, preload: &[String], runs: &[Run]) -> anyhow::Result<()> {
        self.write(Path::new("/init"), &init_script(preload, runs), 0o755)
    }

    /// Packs the tree as an uncompressed newc cpio archive (the kernel unpacks it fastest
    /// and TCG gains nothing from compression).
    pub fn pack(&self, out: &Path) -> anyhow::Result<()> {
        let mut list = String::new();
        walk(&self.root, &self.root, &mut list)?;
        let file =
            std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let mut child = Command::new("cpio")
            .args(["-o", "-H", "newc", "--quiet", "-R", "0:0"])
            .current_dir(&self.root)
            .stdin(Stdio::piped())
            .stdout(file)
            .stderr(Stdio::piped())
            .spawn()
            .context("starting cpio (apt-get install cpio)")?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write as _;
            stdin.write_all(list.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("cpio failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Paths below `root`, relative, one per line, directories before their contents.
fn walk(root: &Path, dir: &Path, list: &mut String) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let _ = writeln!(list, "{}", rel.display());
        if e.file_type()?.is_dir() {
            walk(root, &path, list)?;
        }
    }
    Ok(())
}

fn file_name(p: &Path) -> anyhow::Result<String> {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{} has no file name", p.display()))
}

/// `name` in `PATH` or the sbin directories (which a non-login root shell may lack).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The libraries (and the dynamic loader) `ldd` lists for `elf`, as absolute paths;
/// nothing for a static binary.
fn ldd(elf: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(elf)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // `not a dynamic executable`: static, nothing to copy.
        return Ok(Vec::new());
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", elf.display()))
}

fn parse_ldd(text: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("=> not found") {
            bail!("missing library: {line}");
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no path.
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Single-quotes `s` for the guest's shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn init_script(preload: &[String], runs: &[Run]) -> String {
    let preload = preload.join(" ");
    let mut s = format!(
        r#"#!/bin/busybox sh
# The kernel matrix's guest init, written by `cargo xtask kernels`: runs the test
# binaries and reports on /dev/ttyS1 between "{MARKER}" lines, then powers off.
/bin/busybox --install -s
export PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t bpf bpf /sys/fs/bpf
set -o pipefail
R=/dev/ttyS1
say() {{ echo "{MARKER} $*" > $R; }}
up() {{ cut -d' ' -f1 /proc/uptime; }}
say kernel "$(uname -r)"
say init "$(up)"
missing=
for m in {preload}; do modprobe "$m" 2>/dev/null || missing="$missing $m"; done
[ -n "$missing" ] && say missing-module $missing
ip link set lo up
export XHOST_USER_BIN={BIN_DIR}/xhost-user XH_PROBE_BIN={BIN_DIR}/xh-probe RUST_BACKTRACE=1
# run SUITE ATTACH ENV BINARY ARGS...: its output goes to the results port as it comes;
# the tests that failed run once more on their own, reported as a retry (timing-bound
# tests can lose a race under TCG; a test that fails twice fails).
run() {{
  suite=$1 attach=$2 envs=$3 bin=$4
  shift 4
  say begin "$suite" "$attach" "$(up)"
  env $envs "$bin" "$@" 2>&1 | tee /tmp/run.out > $R
  rc=$?
  say end "$suite" "$attach" "$rc" "$(up)"
  failed=$(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' /tmp/run.out)
  if [ "$rc" != 0 ] && [ -n "$failed" ]; then
    say begin-retry "$suite" "$attach" "$(up)"
    env $envs "$bin" --test-threads=1 --exact $failed > $R 2>&1
    say end-retry "$suite" "$attach" "$?" "$(up)"
  fi
}}
"#
    );
    for r in runs {
        // Split by the guest's shell: names and values are plain words.
        let envs = r
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut line = format!(
            "run {} {} {}",
            quote(&r.suite),
            quote(&r.attach),
            quote(&envs)
        );
        for a in &r.argv {
            line.push(' ');
            line.push_str(&quote(a));
        }
        s.push_str(&line);
        s.push('\n');
    }
    s.push_str("say done \"$(up)\"\npoweroff -f\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).ok(),
            Some(vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ])
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn init_runs_each_suite_between_markers() {
        let s = init_script(
            &["veth".to_owned()],
            &[Run {
                suite: "datapath".into(),
                attach: "tc".into(),
                env: vec![("XHOST_TEST_ATTACH".into(), "tc".into())],
                argv: vec!["/xh/datapath".into(), "--exact".into(), "a_test".into()],
            }],
        );
        assert!(s.contains(
            "run 'datapath' 'tc' 'XHOST_TEST_ATTACH=tc' '/xh/datapath' '--exact' 'a_test'\n"
        ));
        assert!(s.ends_with("say done \"$(up)\"\npoweroff -f\n"));
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
