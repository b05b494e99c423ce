//! Where the running kernel keeps a TCP socket's family, client address and ports,
//! read from the kernel's own type information (`/sys/kernel/btf/vmlinux`).
//!
//! Least-loaded's counter is a BTF tracepoint on `inet_sock_set_state`: the kernel hands it the
//! socket itself, where the classic tracepoint first formatted a record of every state change
//! of every socket on the host, which cost 250–300 ns per change. The program reads the fields
//! at the offsets found here, which the loader sets as constants before the verifier sees it;
//! the verifier checks every read against the same BTF, so an offset that is wrong for the
//! running kernel is refused at load, never misread.
//!
//! BTF's format is small and stable (Documentation/bpf/btf.rst); only what finding a member
//! needs is read: each type's kind and size, and the members of structs and unions.

use anyhow::{bail, Context, Result};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// The running kernel's BTF blob.
pub fn read_vmlinux() -> Result<Vec<u8>> {
    std::fs::read(VMLINUX)
        .with_context(|| format!("reading {VMLINUX} (the kernel's BTF, CONFIG_DEBUG_INFO_BTF)"))
}

/// Byte offsets of the fields the counter program reads, from the start of the socket (a
/// `struct tcp_sock`, which begins with its `struct inet_sock`, which begins with its `struct
/// sock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockLayout {
    /// `sock.__sk_common.skc_family` (AF_INET or AF_INET6).
    pub family: u32,
    /// `sock.__sk_common.skc_daddr`: the client's IPv4 address, network order.
    pub daddr: u32,
    /// `sock.__sk_common.skc_v6_daddr`: the client's IPv6 address (v4-mapped on a dual-stack
    /// socket).
    pub v6_daddr: u32,
    /// `sock.__sk_common.skc_dport`: the client's port, network order.
    pub dport: u32,
    /// `inet_sock.inet_sport`: the server's port, network order. Not `skc_num`, which the kernel
    /// zeroes (releasing the port) before it reports the close.
    pub sport: u32,
}

impl SockLayout {
    /// The layout described by a BTF blob.
    pub fn from_btf(data: &[u8]) -> Result<SockLayout> {
        let btf = Btf::parse(data)?;
        let (sock, inet_sock) = (btf.struct_named("sock")?, btf.struct_named("inet_sock")?);
        if btf.field_offset(inet_sock, "inet_sock", &["sk"], btf.size(sock)?)? != 0 {
            bail!("struct inet_sock does not begin with its struct sock");
        }
        let common =
            |name: &str, size: u32| btf.field_offset(sock, "sock", &["__sk_common", name], size);
        Ok(SockLayout {
            family: common("skc_family", 2)?,
            daddr: common("skc_daddr", 4)?,
            v6_daddr: common("skc_v6_daddr", 16)?,
            dport: common("skc_dport", 2)?,
            sport: btf.field_offset(inet_sock, "inet_sock", &["inet_sport"], 2)?,
        })
    }
}

const KIND_INT: u8 = 1;
const KIND_ARRAY: u8 = 3;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_ENUM: u8 = 6;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_TYPE_TAG: u8 = 18;

struct Type {
    name: u32,
    kind: u8,
    /// The size (ints, structs, unions, enums) or the type referred to (modifiers, typedefs).
    size_or_type: u32,
    /// An array's element type and length.
    array: Option<(u32, u32)>,
    members: Vec<Member>,
}

struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

/// The types and strings of a BTF blob (type ids start at 1; 0 is void).
struct Btf<'a> {
    types: Vec<Type>,
    strings: &'a [u8],
}

fn u32_at(data: &[u8], at: usize) -> Result<u32> {
    let bytes = data
        .get(at..at + 4)
        .context("BTF ends in the middle of a type")?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Result<Btf<'a>> {
        match data.get(0..2) {
            Some([0x9f, 0xeb]) => {}
            Some([0xeb, 0x9f]) => bail!("big-endian BTF is not supported"),
            _ => bail!("not BTF (no 0xeb9f magic)"),
        }
        let header_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types_start = header_len + type_off;
        let type_data = data
            .get(types_start..types_start + type_len)
            .context("BTF's type section is cut short")?;
        let strings = data
            .get(header_len + str_off..header_len + str_off + str_len)
            .context("BTF's string section is cut short")?;
        let mut types = Vec::new();
        let mut at = 0;
        while at < type_data.len() {
            let (name, info) = (u32_at(type_data, at)?, u32_at(type_data, at + 4)?);
            let size_or_type = u32_at(type_data, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = ((info >> 24) & 0x1f) as u8;
            let kind_flag = info >> 31 == 1;
            let mut ty = Type {
                name,
                kind,
                size_or_type,
                array: None,
                members: Vec::new(),
            };
            at += match kind {
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(type_data, m + 8)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (offset & 0xff_ffff, offset >> 24)
                        } else {
                            (offset, 0)
                        };
                        ty.members.push(Member {
                            name: u32_at(type_data, m)?,
                            type_id: u32_at(type_data, m + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    vlen * 12
                }
                KIND_ARRAY => {
                    ty.array = Some((u32_at(type_data, at)?, u32_at(type_data, at + 8)?));
                    12
                }
                // int, var, decl tag: one word.
                KIND_INT | 14 | 17 => 4,
                // enum, func proto: two words per entry.
                KIND_ENUM | 13 => vlen * 8,
                // datasec, enum64: three words per entry.
                15 | 19 => vlen * 12,
                // ptr, fwd, typedef, modifiers, func, float, type tag: nothing more.
                2 | 7..=12 | 16 | KIND_TYPE_TAG => 0,
                other => bail!("BTF type kind {other} is unknown to this cluster-lb"),
            };
            types.push(ty);
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    fn get(&self, id: u32) -> Result<&Type> {
        id.checked_sub(1)
            .and_then(|index| self.types.get(index as usize))
            .with_context(|| format!("BTF type id {id} is out of range"))
    }

    /// The type behind typedefs and qualifiers.
    fn resolved(&self, mut id: u32) -> Result<&Type> {
        for _ in 0..32 {
            let ty = self.get(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type
                }
                _ => return Ok(ty),
            }
        }
        bail!("BTF type {id}: a chain of typedefs too long to follow")
    }

    fn size(&self, id: u32) -> Result<u32> {
        let ty = self.resolved(id)?;
        match (ty.kind, ty.array) {
            (KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM, _) => Ok(ty.size_or_type),
            (KIND_ARRAY, Some((element, count))) => Ok(self.size(element)? * count),
            (kind, _) => bail!("BTF type {id} (kind {kind}) has no size"),
        }
    }

    /// The id of the struct called `name` (the first with members: a forward declaration has none).
    fn struct_named(&self, name: &str) -> Result<u32> {
        self.types
            .iter()
            .position(|t| {
                t.kind == KIND_STRUCT
                    && !t.members.is_empty()
                    && self.name(t.name) == name.as_bytes()
            })
            .map(|index| index as u32 + 1)
            .with_context(|| format!("no struct {name}"))
    }

    /// The byte offset of the member at `path` (each step a member name, looked for also
    /// inside anonymous structs and unions, as C lets code name them), checked to be `size`
    /// bytes and not a bitfield.
    fn field_offset(&self, mut id: u32, within: &str, path: &[&str], size: u32) -> Result<u32> {
        let mut bits = 0;
        for step in path {
            let (offset, member_type) = self
                .find_member(id, step.as_bytes(), 0)?
                .with_context(|| format!("no member {} in struct {within}", path.join(".")))?;
            bits += offset;
            id = member_type;
        }
        if bits % 8 != 0 {
            bail!("{} is not byte-aligned", path.join("."));
        }
        let actual = self.size(id)?;
        if actual != size {
            bail!("{} is {actual} bytes, not {size}", path.join("."));
        }
        Ok(bits / 8)
    }

    /// A member's bit offset and type, searched through anonymous members too.
    fn find_member(&self, id: u32, name: &[u8], depth: u32) -> Result<Option<(u32, u32)>> {
        if depth > 8 {
            return Ok(None);
        }
        let ty = self.resolved(id)?;
        for member in &ty.members {
            if member.name == 0 {
                if let Some((offset, found)) = self.find_member(member.type_id, name, depth + 1)? {
                    return Ok(Some((member.bit_offset + offset, found)));
                }
            } else if self.name(member.name) == name {
                if member.bitfield_size != 0 {
                    bail!("{} is a bitfield", String::from_utf8_lossy(name));
                }
                return Ok(Some((member.bit_offset, member.type_id)));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob written by hand: the parts of `struct sock` the counter reads, with
    /// sock_common's anonymous unions as the kernel declares them.
    fn handmade() -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut name = |s: &str| {
            let offset = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            offset
        };
        let names = [
            name("u16"),
            name("u32"),
            name("sock_common"),
            name("skc_daddr"),
            name("skc_rcv_saddr"),
            name("skc_dport"),
            name("skc_num"),
            name("skc_family"),
            name("skc_v6_daddr"),
            name("sock"),
            name("__sk_common"),
            name("inet_sock"),
            name("__be16"),
            name("sk"),
            name("inet_sport"),
        ];
        let [u16_, u32_, common, daddr, saddr, dport, num, family, v6, sock, sk_common, inet_sock, be16, sk, sport] =
            names;
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend(w.to_le_bytes()));
        let info = |kind: u32, vlen: u32| kind << 24 | vlen;
        // 1: u16, 2: u32 (ints: size, then the encoding word).
        push(&[u16_, info(1, 0), 2, 16]);
        push(&[u32_, info(1, 0), 4, 32]);
        // 3: __be16, a typedef of u16.
        push(&[be16, info(8, 0), 1]);
        // 4: the anonymous struct { skc_daddr, skc_rcv_saddr } and 5: the union holding it.
        push(&[0, info(4, 2), 8, daddr, 2, 0, saddr, 2, 32]);
        push(&[0, info(5, 1), 8, 0, 4, 0]);
        // 6: struct { skc_dport, skc_num } and 7: its union.
        push(&[0, info(4, 2), 4, dport, 3, 0, num, 1, 16]);
        push(&[0, info(5, 1), 4, 0, 6, 0]);
        // 8: u32[4], the in6_addr stand-in.
        push(&[0, info(3, 0), 0, 2, 2, 4]);
        // 9: sock_common { union addrpair @0, union portpair @96 bits, skc_family @128,
        //    skc_v6_daddr @448 }.
        push(&[
            common,
            info(4, 4),
            72,
            0,
            5,
            0,
            0,
            7,
            96,
            family,
            1,
            128,
            v6,
            8,
            448,
        ]);
        // 10: an empty struct also called sock (as a declaration), which the search skips.
        push(&[sock, info(4, 0), 0]);
        // 11: struct sock { __sk_common @0 }, 600 bytes.
        push(&[sock, info(4, 1), 600, sk_common, 9, 0]);
        // 12: struct inet_sock { sk @0, inet_sport @ 4928 bits }.
        push(&[inet_sock, info(4, 2), 700, sk, 11, 0, sport, 3, 4928]);
        let mut blob = Vec::new();
        blob.extend([0x9f, 0xeb, 1, 0]);
        for word in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend(word.to_le_bytes());
        }
        blob.extend(&types);
        blob.extend(&strings);
        blob
    }

    #[test]
    fn members_are_found_through_anonymous_unions() {
        assert_eq!(
            SockLayout::from_btf(&handmade()).expect("the handmade BTF parses"),
            SockLayout {
                family: 16,
                daddr: 0,
                v6_daddr: 56,
                dport: 12,
                sport: 616,
            }
        );
    }

    #[test]
    fn garbage_and_cut_blobs_are_refused_with_a_reason() {
        let error = SockLayout::from_btf(b"garbage").expect_err("not BTF");
        assert!(format!("{error:#}").contains("magic"), "{error:#}");
        let blob = handmade();
        let error = SockLayout::from_btf(&blob[..blob.len() - 40]).expect_err("cut short");
        assert!(format!("{error:#}").contains("cut short"), "{error:#}");
    }

    /// The running kernel's own BTF (every kernel cluster-lb supports has one in the Debian
    /// packages): sock_common's head has not moved since 2.6, and the rest is found.
    #[test]
    fn the_running_kernels_struct_sock_is_read() {
        if !std::path::Path::new(VMLINUX).exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{VMLINUX} is missing: the counter program cannot run here"
            );
            return;
        }
        let blob = read_vmlinux().expect("the kernel's BTF");
        let layout = SockLayout::from_btf(&blob).expect("struct sock's fields");
        assert_eq!((layout.daddr, layout.dport, layout.family), (0, 12, 16));
        assert!(
            layout.v6_daddr > 16 && layout.v6_daddr.is_multiple_of(4),
            "{layout:?}"
        );
        // inet_sock's own fields come after its struct sock, hundreds of bytes long.
        assert!(layout.sport > 512, "{layout:?}");
    }
}
