//! Finding libnccl and building the function table.
//!
//! NCCL must be the very library libtorch loaded. A machine can hold two: a system libnccl.so
//! (measured: 2.28.3 in /usr/lib) beside the wheel's libnccl.so.2 that libtorch_cuda links
//! (2.28.9, found through its rpath `$ORIGIN/../../nvidia/nccl/lib`). cudarc's loader tries
//! "libnccl.so" first, gets the system copy, and its collectives then fail on tensors libtorch
//! allocated. So cudarc's `nccl::sys` functions are never called here; only its type definitions
//! are used, in a table of our own built over the right handle:
//!
//! 1. `dlopen("libnccl.so.2", RTLD_NOW | RTLD_NOLOAD)`: libtorch_cuda has `NEEDED libnccl.so.2`,
//!    so once it is loaded (every binary of the workspace links it, see build/torch_link.rs) this
//!    returns the copy it uses, matched by soname, without loading anything.
//! 2. Otherwise the wheel's file by absolute path, from the torch lib directory known at build
//!    time ([`library_candidates`]).
//!
//! Plain "libnccl.so" (the development symlink, which is what a system install provides) is never
//! tried.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId};
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};

/// NCCL calls return `ncclResult_t`, taken here as a plain `c_int` (same ABI): a code this build's
/// enum does not list (a newer NCCL adds codes) must not become an invalid Rust enum value.
pub(crate) type RawResult = c_int;

/// `ncclSuccess`.
pub(crate) const SUCCESS: RawResult = ncclResult_t::ncclSuccess as RawResult;

/// The first NCCL with everything this backend uses: bf16 (`ncclBfloat16`) and `ncclAvg` came in
/// 2.10.
const MIN_VERSION: i32 = 21000;

type SendFn = unsafe extern "C" fn(*const c_void, usize, ncclDataType_t, c_int, ncclComm_t, cudaStream_t) -> RawResult;
type RecvFn = unsafe extern "C" fn(*mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, cudaStream_t) -> RawResult;
type ReduceFn = unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t) -> RawResult;

/// The NCCL entry points, resolved once from the library libtorch uses. Signatures are nccl.h's
/// (2.28), with `ncclResult_t` as [`RawResult`].
pub(crate) struct Nccl {
    /// Keeps the handle (and so the function pointers) valid for the life of the process.
    _lib: Library,
    pub(crate) path: PathBuf,
    pub(crate) version: i32,
    pub(crate) get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> RawResult,
    /// `ncclCommInitRank(comm*, nranks, commId, rank)`: the id is passed by value (128 bytes).
    pub(crate) comm_init_rank: unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> RawResult,
    pub(crate) comm_abort: unsafe extern "C" fn(ncclComm_t) -> RawResult,
    pub(crate) comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut RawResult) -> RawResult,
    pub(crate) get_error_string: unsafe extern "C" fn(RawResult) -> *const c_char,
    /// Since 2.13; a human-readable account of the last failure, more useful than the code.
    pub(crate) get_last_error: Option<unsafe extern "C" fn(ncclComm_t) -> *const c_char>,
    pub(crate) all_reduce: ReduceFn,
    /// `ncclBroadcast(sendbuff, recvbuff, count, datatype, root, comm, stream)`.
    pub(crate) broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, cudaStream_t) -> RawResult,
    /// `ncclAllGather(sendbuff, recvbuff, sendcount, ...)`: the count is per rank.
    pub(crate) all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclComm_t, cudaStream_t) -> RawResult,
    /// `ncclReduceScatter(sendbuff, recvbuff, recvcount, ...)`: the count is per rank.
    pub(crate) reduce_scatter: ReduceFn,
    pub(crate) send: SendFn,
    pub(crate) recv: RecvFn,
    /// `ncclGroupStart()` / `ncclGroupEnd()`: point-to-point calls that must progress together
    /// (both directions of an exchange, a ring) have to be issued inside one group.
    pub(crate) group_start: unsafe extern "C" fn() -> RawResult,
    pub(crate) group_end: unsafe extern "C" fn() -> RawResult,
}

/// Where the wheel's NCCL sits relative to `torch/lib`, as libtorch_cuda's rpath says
/// (`$ORIGIN/../../nvidia/nccl/lib`), then `torch/lib` itself (libtorch builds that bundle it).
/// Versioned names only: "libnccl.so" is what a system install provides, and the wrong library.
pub fn library_candidates(torch_lib: &Path) -> Vec<PathBuf> {
    vec![torch_lib.join("..").join("..").join("nvidia").join("nccl").join("lib").join("libnccl.so.2"), torch_lib.join("libnccl.so.2")]
}

/// The torch lib directory of the libtorch this process runs on: where `libtorch_cpu.so` is
/// mapped (a binary carried to another machine finds that machine's wheel through
/// `LD_LIBRARY_PATH`), else the one this crate was built against (torch-sys's
/// `DEP_TCH_LIBTORCH_LIB`).
pub fn torch_lib_dir() -> PathBuf {
    loaded_torch_lib_dir().unwrap_or_else(|| PathBuf::from(env!("FABBRICA_TORCH_LIB")))
}

/// The folder of the `libtorch_cpu.so` mapped into this process, from `/proc/self/maps` (read
/// up to 16 MiB: a process maps a few thousand files at most).
fn loaded_torch_lib_dir() -> Option<PathBuf> {
    use std::io::Read;
    let mut maps = String::new();
    std::fs::File::open("/proc/self/maps").ok()?.take(16 << 20).read_to_string(&mut maps).ok()?;
    torch_lib_in_maps(&maps)
}

/// The folder of the first `libtorch_cpu.so` in a `/proc/PID/maps` text.
pub fn torch_lib_in_maps(maps: &str) -> Option<PathBuf> {
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(Path::new)
        .find(|p| p.is_absolute() && p.file_name().is_some_and(|n| n == "libtorch_cpu.so"))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
}

static NCCL: OnceLock<Result<Nccl, String>> = OnceLock::new();

/// The function table, loaded on first use; the error says what was tried.
pub(crate) fn nccl() -> Result<&'static Nccl, String> {
    NCCL.get_or_init(load).as_ref().map_err(|e| e.clone())
}

fn load() -> Result<Nccl, String> {
    let mut tried = Vec::new();
    // SAFETY: RTLD_NOLOAD maps nothing new, so no initialiser runs.
    match unsafe { Library::open(Some("libnccl.so.2"), RTLD_NOW | libc::RTLD_NOLOAD) } {
        Ok(lib) => return Nccl::resolve(lib),
        Err(_) => tried.push("libnccl.so.2 (not loaded by libtorch_cuda in this process)".to_string()),
    }
    for path in library_candidates(&torch_lib_dir()) {
        if !path.exists() {
            tried.push(format!("{} (no such file)", path.display()));
            continue;
        }
        let Some(name) = path.to_str() else {
            tried.push(format!("{} (not UTF-8)", path.display()));
            continue;
        };
        // SAFETY: this is libtorch's own NCCL build; its initialisers are what libtorch_cuda
        // would have run when loading it.
        match unsafe { Library::open(Some(name), RTLD_NOW | RTLD_LOCAL) } {
            Ok(lib) => return Nccl::resolve(lib),
            Err(e) => tried.push(format!("{} ({e})", path.display())),
        }
    }
    Err(format!("NCCL could not be loaded; tried: {}", tried.join("; ")))
}

impl Nccl {
    fn resolve(lib: Library) -> Result<Nccl, String> {
        // SAFETY (every `get`): the types are nccl.h's prototypes of these symbols.
        unsafe fn sym<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
            lib.get::<T>(name).map(|s| *s).map_err(|e| format!("NCCL has no {name}: {e}"))
        }
        // SAFETY: each `sym` asks for a symbol at nccl.h's prototype for it, and `lib` moves into
        // the returned table (`_lib`), which keeps every resolved pointer valid; ncclGetVersion
        // only writes the local `version`.
        unsafe {
            let get_version: unsafe extern "C" fn(*mut c_int) -> RawResult = sym(&lib, "ncclGetVersion")?;
            let mut version: c_int = 0;
            if get_version(&mut version) != SUCCESS {
                return Err("ncclGetVersion failed".into());
            }
            let path = loaded_path(get_version as *const c_void).unwrap_or_else(|| PathBuf::from("libnccl.so.2"));
            if version < MIN_VERSION {
                return Err(format!("NCCL {} at {} is older than 2.10, which bf16 and avg need", version_string(version), path.display()));
            }
            Ok(Nccl {
                path,
                version,
                get_unique_id: sym(&lib, "ncclGetUniqueId")?,
                comm_init_rank: sym(&lib, "ncclCommInitRank")?,
                comm_abort: sym(&lib, "ncclCommAbort")?,
                comm_get_async_error: sym(&lib, "ncclCommGetAsyncError")?,
                get_error_string: sym(&lib, "ncclGetErrorString")?,
                get_last_error: sym(&lib, "ncclGetLastError").ok(),
                all_reduce: sym(&lib, "ncclAllReduce")?,
                broadcast: sym(&lib, "ncclBroadcast")?,
                all_gather: sym(&lib, "ncclAllGather")?,
                reduce_scatter: sym(&lib, "ncclReduceScatter")?,
                send: sym(&lib, "ncclSend")?,
                recv: sym(&lib, "ncclRecv")?,
                group_start: sym(&lib, "ncclGroupStart")?,
                group_end: sym(&lib, "ncclGroupEnd")?,
                _lib: lib,
            })
        }
    }

    /// "ncclX failed: <code's text> (<last error>)", the detail of a `CommError::Backend`.
    pub(crate) fn describe(&self, call: &str, rc: RawResult, comm: ncclComm_t) -> String {
        // SAFETY: both return static or comm-owned NUL-terminated strings (or NULL).
        let text = unsafe { c_text((self.get_error_string)(rc)) }.unwrap_or_else(|| format!("error {rc}"));
        let last = match self.get_last_error {
            // SAFETY: as above: ncclGetLastError returns NULL or a NUL-terminated string NCCL owns.
            Some(f) => unsafe { c_text(f(comm)) }.filter(|s| !s.is_empty()),
            None => None,
        };
        match last {
            Some(last) => format!("{call} failed: {text} ({last})"),
            None => format!("{call} failed: {text}"),
        }
    }
}

unsafe fn c_text(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        Some(CStr::from_ptr(p).to_string_lossy().into_owned())
    }
}

/// The file the symbol at `addr` was loaded from, canonical where it exists.
fn loaded_path(addr: *const c_void) -> Option<PathBuf> {
    // SAFETY: Dl_info is a plain C struct of pointers: all-zero (null) is a valid value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the loader's tables.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr succeeded and `dli_fname` is non-null: a NUL-terminated path in the loader's
    // tables, valid while the object stays loaded (it is: `addr` is in a library we hold open).
    let raw = PathBuf::from(unsafe { CStr::from_ptr(info.dli_fname) }.to_string_lossy().into_owned());
    Some(std::fs::canonicalize(&raw).unwrap_or(raw))
}

/// "2.28.9" from 22809 (and "2.8.4" from the pre-2.9 encoding 2804).
pub fn version_string(code: i32) -> String {
    if code >= 10000 {
        format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, (code % 1000) / 100, code % 100)
    }
}
