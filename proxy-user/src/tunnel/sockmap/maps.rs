//! The program's per-tunnel maps, changed with the `bpf()` system call directly.
//!
//! aya's typed maps take `&mut self` to insert or remove, so every tunnel's map changes were
//! serialised on a `Mutex`: with two tokio workers opening tunnels at once they contended on it
//! (about three futex calls per handshake, measured). The kernel's map operations are safe to
//! run concurrently, so these take `&self`. Where a tunnel changes both of its sockets' entries in
//! one hash map, one `BPF_MAP_*_BATCH` call does both (12 `bpf()` calls per tunnel instead of 26;
//! see docs/kernel-notes.md). aya still loads the program and owns every map's fd.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use aya::Pod;
use aya::maps::{Map, MapData};

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The part of `union bpf_attr` the `BPF_MAP_*_ELEM` commands read.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value`, or `next_key` for `BPF_MAP_GET_NEXT_KEY`.
    value: u64,
    flags: u64,
}

/// The part of `union bpf_attr` the `BPF_MAP_*_BATCH` commands read.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// Keys given; on return, how many were done.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs one `bpf()` command; `Ok` when it returned 0.
fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, valid for the size
    // given (the kernel zero-extends a shorter attr); every pointer in it points at memory that
    // outlives the call, sized for the map's keys and values by `RawMap`'s types.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut A).cast::<libc::c_void>(),
            std::mem::size_of::<A>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn addr<T>(p: *const T) -> u64 {
    p as usize as u64
}

/// One of the program's maps, keyed by `K` with values `V` (for a sockhash, `V` is the socket's
/// fd on update).
pub(super) struct RawMap<K, V> {
    data: MapData,
    _types: PhantomData<fn(K, V)>,
}

impl<K: Pod, V: Pod> RawMap<K, V> {
    /// Takes the map out of aya's typed world; fails for a map type this does not serve.
    pub(super) fn new(map: Map) -> Result<Self, String> {
        let data = match map {
            Map::HashMap(d) | Map::SockHash(d) => d,
            other => return Err(format!("unexpected map type {other:?}")),
        };
        Ok(RawMap {
            data,
            _types: PhantomData,
        })
    }

    fn fd(&self) -> RawFd {
        self.data.fd().as_fd().as_raw_fd()
    }

    fn elem(&self, key: &K, value: u64, flags: u64) -> ElemAttr {
        ElemAttr {
            map_fd: self.fd() as u32,
            key: addr(key),
            value,
            flags,
            ..ElemAttr::default()
        }
    }

    /// Creates or replaces `key`'s entry.
    pub(super) fn update(&self, key: &K, value: &V) -> io::Result<()> {
        bpf(BPF_MAP_UPDATE_ELEM, &mut self.elem(key, addr(value), 0))
    }

    /// Runs a command that writes `key`'s value into a buffer; `None` when there is no entry.
    fn read(&self, cmd: libc::c_long, key: &K) -> io::Result<Option<V>> {
        let mut value = std::mem::MaybeUninit::<V>::zeroed();
        match bpf(cmd, &mut self.elem(key, addr(value.as_mut_ptr()), 0)) {
            // SAFETY: the kernel wrote a whole value; V is Pod, valid for any bytes.
            Ok(()) => Ok(Some(unsafe { value.assume_init() })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `key`'s value; `None` when there is no entry.
    pub(super) fn lookup(&self, key: &K) -> io::Result<Option<V>> {
        self.read(BPF_MAP_LOOKUP_ELEM, key)
    }

    /// Removes `key`'s entry and returns its value; `None` when there was none.
    pub(super) fn take(&self, key: &K) -> io::Result<Option<V>> {
        match self.read(BPF_MAP_LOOKUP_AND_DELETE_ELEM, key) {
            // Before 5.14 hash maps have no lookup-and-delete: two calls.
            Err(e) if unsupported(&e) => {
                let value = self.lookup(key)?;
                self.delete(key)?;
                Ok(value)
            }
            other => other,
        }
    }

    /// Removes `key`'s entry; a missing one is not an error.
    pub(super) fn delete(&self, key: &K) -> io::Result<()> {
        match bpf(BPF_MAP_DELETE_ELEM, &mut self.elem(key, 0, 0)) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
            _ => Ok(()),
        }
    }

    fn batch(&self, keys: &[K], values: Option<&[V]>) -> BatchAttr {
        BatchAttr {
            keys: addr(keys.as_ptr()),
            values: values.map_or(0, |v| addr(v.as_ptr())),
            count: keys.len() as u32,
            map_fd: self.fd() as u32,
            ..BatchAttr::default()
        }
    }

    /// Creates or replaces every `keys[i]` with `values[i]`, in one call where the kernel can.
    pub(super) fn update_all(&self, keys: &[K], values: &[V]) -> io::Result<()> {
        assert_eq!(keys.len(), values.len(), "a value for every key");
        let mut attr = self.batch(keys, Some(values));
        match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
            Ok(()) => Ok(()),
            // No batch updates for this map type here (the kernel then leaves `count` as it
            // was): one call per key.
            Err(e) if unsupported(&e) => {
                for (k, v) in keys.iter().zip(values) {
                    self.update(k, v)?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Removes every key's entry, in one call where the kernel can; missing ones are skipped.
    pub(super) fn delete_all(&self, keys: &[K]) -> io::Result<()> {
        let mut attr = self.batch(keys, None);
        match bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => Ok(()),
            // The kernel stops at the first key it cannot delete (a missing one, say), with
            // `count` saying how many it did: the rest go one by one. A map type without batch
            // deletes (a sockhash) leaves `count` as it was: then every key.
            Err(e) => {
                let done = if unsupported(&e) {
                    0
                } else {
                    attr.count as usize
                };
                let mut result = Ok(());
                for k in keys.iter().skip(done) {
                    if let Err(e) = self.delete(k) {
                        result = Err(e);
                    }
                }
                result
            }
        }
    }

    /// Entries in the map, counted by walking its keys.
    pub(super) fn len(&self) -> usize {
        let mut key = std::mem::MaybeUninit::<K>::zeroed();
        let mut n = 0;
        let mut first = true;
        loop {
            let mut next = std::mem::MaybeUninit::<K>::zeroed();
            let mut attr = ElemAttr {
                map_fd: self.fd() as u32,
                // NULL asks for the first key.
                key: if first { 0 } else { addr(key.as_ptr()) },
                value: addr(next.as_mut_ptr()),
                ..ElemAttr::default()
            };
            if bpf(BPF_MAP_GET_NEXT_KEY, &mut attr).is_err() {
                return n;
            }
            n += 1;
            first = false;
            key = next;
        }
    }
}

/// The kernel's own `ENOTSUPP` (include/linux/errno.h), which `bpf()` returns for a batch
/// command the map type lacks.
const ENOTSUPP: i32 = 524;

/// The kernel has no such command for this map type (or no such command at all).
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}
