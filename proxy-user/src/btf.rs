//! Finds where a field lives in one of the running kernel's structs, from the kernel's own type
//! information (BTF, `/sys/kernel/btf/vmlinux`).
//!
//! The verdict program reads `tcp_sock.bytes_acked` of a peer socket to bound a tunnel's
//! backlog; the offset differs between kernel builds, so it is looked up here at start-up and
//! handed to the program as a global. Only what that needs is parsed: the header, the string
//! section, and the type records (each skipped by its kind's size), as laid out in the kernel's
//! `Documentation/bpf/btf.rst`.

/// Where the running kernel publishes its BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Why a member offset could not be found. `Display` is one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("reading {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("kernel BTF: {strukt}.{member} is a bitfield")]
    Bitfield { strukt: String, member: String },
}

/// The offsets the verdict program reads kernel structs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `tcp_sock.bytes_acked` (u64): how far a peer has drained, for the backlog bound.
    pub tcp_sock_bytes_acked: u32,
    /// `tcp_sock.copied_seq` (u32): what userspace read before arming.
    pub tcp_sock_copied_seq: u32,
    /// `TCP_SKB_CB(skb)->seq` (u32) from the start of `sk_buff`: `sk_buff.cb` + `tcp_skb_cb.seq`.
    pub skb_tcp_seq: u32,
}

impl KernelOffsets {
    /// Reads them from the running kernel's BTF.
    pub fn read() -> Result<KernelOffsets, BtfError> {
        let data = std::fs::read(VMLINUX).map_err(|e| BtfError::Read {
            path: VMLINUX.into(),
            reason: e.to_string(),
        })?;
        Ok(KernelOffsets {
            tcp_sock_bytes_acked: member_offset(&data, "tcp_sock", "bytes_acked")?,
            tcp_sock_copied_seq: member_offset(&data, "tcp_sock", "copied_seq")?,
            skb_tcp_seq: member_offset(&data, "sk_buff", "cb")?
                + member_offset(&data, "tcp_skb_cb", "seq")?,
        })
    }
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// Byte offset of `member` in `struct strukt` in the BTF blob `data` (native endian).
pub fn member_offset(data: &[u8], strukt: &str, member: &str) -> Result<u32, BtfError> {
    let u16_at = |off: usize| -> Option<u16> {
        Some(u16::from_ne_bytes(data.get(off..off + 2)?.try_into().ok()?))
    };
    let u32_at = |off: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(data.get(off..off + 4)?.try_into().ok()?))
    };
    if u16_at(0) != Some(MAGIC) {
        return Err(BtfError::Malformed("bad magic (or foreign endianness)"));
    }
    let header = (|| {
        let hdr_len = u32_at(4)? as usize;
        let type_off = u32_at(8)? as usize;
        let type_len = u32_at(12)? as usize;
        let str_off = u32_at(16)? as usize;
        let str_len = u32_at(20)? as usize;
        Some((
            hdr_len + type_off,
            hdr_len + type_off + type_len,
            hdr_len + str_off,
            str_len,
        ))
    })();
    let (types_start, types_end, strs_start, strs_len) =
        header.ok_or(BtfError::Malformed("short header"))?;
    let strings = data
        .get(strs_start..strs_start + strs_len)
        .ok_or(BtfError::Malformed("string section out of bounds"))?;
    let name_at = |off: u32| -> Option<&[u8]> {
        let rest = strings.get(off as usize..)?;
        Some(&rest[..rest.iter().position(|&b| b == 0)?])
    };

    let mut at = types_start;
    while at < types_end {
        let (name_off, info) = u32_at(at)
            .zip(u32_at(at + 4))
            .ok_or(BtfError::Malformed("truncated type record"))?;
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let kind_flag = info >> 31 == 1;
        let body = at + 12;
        if kind == KIND_STRUCT && name_at(name_off) == Some(strukt.as_bytes()) {
            for i in 0..vlen {
                let m = body + i * 12;
                let (m_name, m_offset) = u32_at(m)
                    .zip(u32_at(m + 8))
                    .ok_or(BtfError::Malformed("truncated member"))?;
                if name_at(m_name) != Some(member.as_bytes()) {
                    continue;
                }
                // With kind_flag, the top 8 bits are a bitfield size and the low 24 the offset.
                let (bits, size) = if kind_flag {
                    (m_offset & 0x00ff_ffff, m_offset >> 24)
                } else {
                    (m_offset, 0)
                };
                if size != 0 || bits % 8 != 0 {
                    return Err(BtfError::Bitfield {
                        strukt: strukt.into(),
                        member: member.into(),
                    });
                }
                return Ok(bits / 8);
            }
            return Err(BtfError::NoMember {
                strukt: strukt.into(),
                member: member.into(),
            });
        }
        at = body + extra_len(kind, vlen).ok_or(BtfError::Malformed("unknown type kind"))?;
    }
    Err(BtfError::NoStruct(strukt.into()))
}

/// Bytes that follow the 12-byte common record for each BTF kind.
fn extra_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
        // INT, VAR, DECL_TAG
        1 | 14 | 17 => 4,
        // ARRAY
        3 => 12,
        // STRUCT, UNION, DATASEC, ENUM64
        4 | 5 | 15 | 19 => vlen * 12,
        // ENUM, FUNC_PROTO
        6 | 13 => vlen * 8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built blob: struct s { int a; u64 b; unsigned c:3; }.
    fn blob() -> Vec<u8> {
        let strings = b"\0s\0a\0b\0c\0int\0".to_vec();
        let (s_s, s_a, s_b, s_c, s_int) = (1u32, 3u32, 5u32, 7u32, 9u32);
        let mut types = Vec::new();
        let mut put = |v: u32| types.extend_from_slice(&v.to_ne_bytes());
        // [1] INT "int": size 4, then the int encoding word.
        put(s_int);
        put(1 << 24);
        put(4);
        put(32);
        // [2] a FUNC_PROTO with 2 params, to exercise skipping vlen * 8.
        put(0);
        put((13 << 24) | 2);
        put(1);
        for _ in 0..4 {
            put(0);
        }
        // [3] STRUCT "s", kind_flag set, 3 members.
        put(s_s);
        put((1 << 31) | (4 << 24) | 3);
        put(24);
        for (name, bit_off) in [(s_a, 0u32), (s_b, 64), (s_c, (3 << 24) | 128)] {
            put(name);
            put(1);
            put(bit_off);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_ne_bytes());
        out.push(1); // version
        out.push(0); // flags
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_ne_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_members_and_refuses_the_rest() {
        let b = blob();
        assert_eq!(member_offset(&b, "s", "a"), Ok(0));
        assert_eq!(member_offset(&b, "s", "b"), Ok(8));
        assert!(matches!(
            member_offset(&b, "s", "c"),
            Err(BtfError::Bitfield { .. })
        ));
        assert!(matches!(
            member_offset(&b, "s", "zz"),
            Err(BtfError::NoMember { .. })
        ));
        assert_eq!(
            member_offset(&b, "t", "a"),
            Err(BtfError::NoStruct("t".into()))
        );
        assert!(matches!(
            member_offset(&b[..30], "s", "a"),
            Err(BtfError::Malformed(_))
        ));
        assert!(matches!(
            member_offset(b"nope", "s", "a"),
            Err(BtfError::Malformed(_))
        ));
    }

    #[test]
    fn running_kernel_has_the_offsets() {
        if !std::path::Path::new(VMLINUX).exists() {
            eprintln!("skipping: {VMLINUX} missing");
            return;
        }
        let o = KernelOffsets::read().expect("offsets");
        // tcp_sock starts with inet_connection_sock, which is far larger than a few bytes.
        assert!(o.tcp_sock_bytes_acked > 1000, "implausible {o:?}");
        assert!(o.tcp_sock_copied_seq > 1000, "implausible {o:?}");
        assert_eq!(o.tcp_sock_bytes_acked % 8, 0, "a u64 is 8-byte aligned");
        // cb comes after the list pointers and the socket pointer of sk_buff.
        assert!(
            o.skb_tcp_seq >= 24 && o.skb_tcp_seq < 256,
            "implausible {o:?}"
        );
    }
}
