//! Which segments the verifier checks: the scope.
//!
//! **SA scope** (the default wherever the kernel has BTF): the verifier reads each segment's own
//! IPsec state from the skb's `sec_path` and checks exactly the segments that a transport-mode
//! SA with UDP or TCP encapsulation decapsulated, the ones after which `esp_input_done2` skipped
//! the check. Rust eBPF programs cannot emit CO-RE relocations today, so this module reads the
//! offsets (and the size of `sec_path.len`, which moved and shrank in 7.x) from the running
//! kernel's BTF at load time and hands them to the program as a load-time constant.
//!
//! **Address scope** (kernels without BTF, or `--scope address`): the old guess by source address,
//! with exemptions for IKE ports and partial checksums. It cannot tell plaintext from decapsulated
//! traffic in general; docs/verifier.md says where it goes wrong.

use std::{fmt, path::Path};

use btfparse::{Offset, Readable, TypeInformation, TypeVariant};
use monitor_ebpf::SecpathLayout;

/// The kernel's BTF, where `/sys` is mounted normally.
pub const VMLINUX_BTF: &str = "kernel/btf/vmlinux";

/// The scope in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// From each segment's `sec_path`.
    Sa(SecpathLayout),
    /// By source address.
    Address,
}

impl Scope {
    /// The value of the `scope` label and log field.
    #[must_use]
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::Sa(_) => "sa",
            Self::Address => "address",
        }
    }

    /// The constant the program is loaded with (all zero for address scope).
    #[must_use]
    pub fn layout(&self) -> SecpathLayout {
        match self {
            Self::Sa(l) => *l,
            Self::Address => SecpathLayout::default(),
        }
    }
}

/// Why SA scope is not available.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The BTF file could not be read or parsed.
    #[error("reading BTF from {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A type, member or enumerator is missing, or has an unexpected shape.
    #[error("{path}: {what}")]
    Shape {
        /// The file.
        path: String,
        /// What is missing or odd, naming the kernel structure.
        what: String,
    },
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What address scope costs, said wherever natt-monitor falls back to it (the daemon's warning,
/// `natt-monitor check`).
pub const FALLBACK_COST: &str = "plaintext from peers is told apart only by IKE ports and partial checksums, and enforce applies only to peers with an exact residual (learned peers run in observe)";

/// Why SA scope cannot run on this kernel.
#[derive(Debug, thiserror::Error)]
pub enum NoSaScope {
    /// The program cannot read kernel memory.
    #[error(
        "no bpf_probe_read_kernel for cgroup_skb (Linux 5.5+), so a segment's IPsec state cannot be read"
    )]
    NoProbeRead,
    /// The kernel's BTF does not say where the IPsec state lies.
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// SA scope's layout on this kernel (`btf`, normally `/sys/kernel/btf/vmlinux`), given whether
/// the kernel offers `bpf_probe_read_kernel` to `cgroup_skb` programs: the one choice the daemon
/// (`--scope auto` or `sa`) and `natt-monitor check` both make.
///
/// # Errors
/// `NoSaScope` saying why address scope is all this kernel allows.
pub fn sa_layout(btf: &Path, probe_read_kernel: bool) -> Result<SecpathLayout, NoSaScope> {
    if !probe_read_kernel {
        return Err(NoSaScope::NoProbeRead);
    }
    Ok(layout_from(btf)?)
}

/// Reads the `sec_path` layout from a BTF file (normally `/sys/kernel/btf/vmlinux`).
///
/// # Errors
/// `LayoutError` naming the file and the structure or member that is missing.
pub fn layout_from(btf: &Path) -> Result<SecpathLayout, LayoutError> {
    let path = btf.display().to_string();
    if !btf.exists() {
        return Err(LayoutError::Read {
            path,
            reason: "no such file (the kernel was built without CONFIG_DEBUG_INFO_BTF)".into(),
        });
    }
    let bytes = std::fs::read(btf).map_err(|e| LayoutError::Read {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let ti = TypeInformation::new(&Bytes(&bytes)).map_err(|e| LayoutError::Read {
        path: path.clone(),
        reason: format!("{e:?}"),
    })?;
    Btf { ti: &ti, path }.layout()
}

/// BTF read whole into memory (a few MiB) and parsed from there.
struct Bytes<'a>(&'a [u8]);

impl Readable for Bytes<'_> {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).ok();
        match start.and_then(|s| self.0.get(s..s.checked_add(buffer.len())?)) {
            Some(src) => {
                buffer.copy_from_slice(src);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::IOError,
                "read past the end of the BTF data",
            )),
        }
    }
}

struct Btf<'a> {
    ti: &'a TypeInformation,
    path: String,
}

impl Btf<'_> {
    fn shape(&self, what: impl Into<String>) -> LayoutError {
        LayoutError::Shape {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    /// The id of the struct, union or enum called `name`. The name index keeps one id per
    /// name, and on some kernels (5.10) that is a forward declaration, which has no members:
    /// then the whole type list is searched for the definition.
    fn type_id(&self, name: &str) -> Result<u32, LayoutError> {
        let defines = |v: &TypeVariant| {
            matches!(
                v,
                TypeVariant::Struct(_) | TypeVariant::Union(_) | TypeVariant::Enum(_)
            )
        };
        if let Some(id) = self.ti.id_of(name)
            && self.ti.from_id(id).is_some_and(|v| defines(&v))
        {
            return Ok(id);
        }
        self.ti
            .get()
            .iter()
            .find(|(id, v)| defines(v) && self.ti.name_of(**id).as_deref() == Some(name))
            .map(|(id, _)| *id)
            .ok_or_else(|| self.shape(format!("no struct, union or enum `{name}`")))
    }

    /// Byte offset and size of `ty.path` (a dotted member path).
    fn member(&self, ty: &str, path: &str) -> Result<(u32, u32), LayoutError> {
        let tid = self.type_id(ty)?;
        let (mtid, off) = self
            .ti
            .offset_of(tid, path)
            .map_err(|e| self.shape(format!("no member `{ty}.{path}` ({e:?})")))?;
        let Offset::ByteOffset(off) = off else {
            return Err(self.shape(format!("`{ty}.{path}` is a bitfield")));
        };
        let size = self
            .ti
            .size_of(mtid)
            .map_err(|e| self.shape(format!("size of `{ty}.{path}` ({e:?})")))?;
        Ok((off, u32::try_from(size).unwrap_or(u32::MAX)))
    }

    /// Offset of `ty.path`, which must be `size` bytes wide.
    fn sized(&self, ty: &str, path: &str, size: u32) -> Result<u32, LayoutError> {
        let (off, got) = self.member(ty, path)?;
        if got != size {
            return Err(self.shape(format!(
                "`{ty}.{path}` is {got} bytes wide, expected {size}"
            )));
        }
        Ok(off)
    }

    fn enumerator(&self, ty: &str, name: &str) -> Result<u32, LayoutError> {
        let tid = self.type_id(ty)?;
        let Some(TypeVariant::Enum(e)) = self.ti.from_id(tid) else {
            return Err(self.shape(format!("`{ty}` is not an enum")));
        };
        e.named_value_list()
            .iter()
            .find(|v| v.name == name)
            .map(|v| match v.value {
                btfparse::Integer32Value::Signed(i) => u32::try_from(i).unwrap_or(u32::MAX),
                btfparse::Integer32Value::Unsigned(u) => u,
            })
            .ok_or_else(|| {
                self.shape(format!(
                    "enum `{ty}` has no `{name}` (a kernel without CONFIG_XFRM?)"
                ))
            })
    }

    fn layout(&self) -> Result<SecpathLayout, LayoutError> {
        let sec_path_id = self.enumerator("skb_ext_id", "SKB_EXT_SEC_PATH")?;
        if sec_path_id >= 8 {
            return Err(self.shape(format!(
                "SKB_EXT_SEC_PATH is {sec_path_id}, past the 8 bits of `active_extensions`"
            )));
        }
        let (ext_offset, ext_offset_len) = self.member("skb_ext", "offset")?;
        if sec_path_id >= ext_offset_len {
            return Err(self.shape("`skb_ext.offset` has no slot for SKB_EXT_SEC_PATH"));
        }
        let (sp_len, sp_len_size) = self.member("sec_path", "len")?;
        if sp_len_size != 1 && sp_len_size != 4 {
            return Err(self.shape(format!(
                "`sec_path.len` is {sp_len_size} bytes wide, expected 1 or 4"
            )));
        }
        let (sp_xvec, xvec_size) = self.member("sec_path", "xvec")?;
        if xvec_size < 8 * monitor_ebpf::XFRM_MAX_DEPTH {
            return Err(self.shape(format!(
                "`sec_path.xvec` is {xvec_size} bytes, expected XFRM_MAX_DEPTH pointers"
            )));
        }
        let encap_sport = self.sized("xfrm_encap_tmpl", "encap_sport", 2)?;
        if self.sized("xfrm_encap_tmpl", "encap_dport", 2)? != encap_sport + 2 {
            return Err(self.shape("`xfrm_encap_tmpl.encap_dport` does not follow `encap_sport`"));
        }
        Ok(SecpathLayout {
            enabled: 1,
            skb_active_extensions: self.sized("sk_buff", "active_extensions", 1)?,
            sec_path_bit: 1 << sec_path_id,
            skb_extensions: self.sized("sk_buff", "extensions", 8)?,
            ext_sec_path_offset: ext_offset + sec_path_id,
            sp_len,
            sp_len_size,
            sp_xvec,
            x_encap: self.sized("xfrm_state", "encap", 8)?,
            x_mode: self.sized("xfrm_state", "props.mode", 1)?,
            x_spi: self.sized("xfrm_state", "id.spi", 4)?,
            x_reqid: self.sized("xfrm_state", "props.reqid", 4)?,
            encap_sport,
            x_km_state: self.sized("xfrm_state", "km.state", 1)?,
            skb_dev: self.sized("sk_buff", "dev", 8)?,
            dev_net: self.sized("net_device", "nd_net.net", 8)?,
            net_inum: self.sized("net", "ns.inum", 4)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_kernels_layout() {
        let path = Path::new("/sys").join(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: {} missing (kernel without BTF)", path.display());
            return;
        }
        let l = layout_from(&path).unwrap();
        assert_eq!(l.enabled, 1);
        assert!(l.sp_len_size == 1 || l.sp_len_size == 4, "{l:?}");
        // Every offset lies inside its structure and the pointers are 8-byte aligned.
        assert_eq!(l.skb_extensions % 8, 0, "{l:?}");
        assert_eq!(l.sp_xvec % 8, 0, "{l:?}");
        assert_eq!(l.x_encap % 8, 0, "{l:?}");
        assert!(l.sec_path_bit.is_power_of_two(), "{l:?}");
    }

    #[test]
    fn a_missing_file_names_the_path_and_the_cause() {
        let e = layout_from(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "reading BTF from /nonexistent/vmlinux: no such file (the kernel was built without \
             CONFIG_DEBUG_INFO_BTF)"
        );
    }
}
