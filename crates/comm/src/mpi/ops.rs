//! MPI datatypes and reductions: bf16/f16 as 16-bit words with user-defined sum/max/min
//! operations, and MPI return codes as errors.

use std::os::raw::{c_int, c_void};

use mpi::ffi;
use std::sync::OnceLock;

use crate::error::{CommError, OpContext, Result};
use crate::types::{DType, ReduceOp};

extern "C" {
    fn fabbrica_mpi_in_place() -> *mut c_void;
}

pub(super) struct UserOps([ffi::MPI_Op; 6]);
// SAFETY: opaque MPI_Op handles, created once by `create_user_ops` and never freed or changed.
// MPI is initialised at MPI_THREAD_MULTIPLE (`world::init_with` asks for `Threading::Multiple` and
// returns an error for any lower level; every `MpiComm` descends from `MpiComm::world`, which only
// `init_with` calls, after that check), so they may be used from any thread.
unsafe impl Send for UserOps {}
// SAFETY: as for `Send`: shared use is read-only (handles passed by value to MPI calls), which
// MPI_THREAD_MULTIPLE allows from several threads at once.
unsafe impl Sync for UserOps {}
static USER_OPS: OnceLock<UserOps> = OnceLock::new();

macro_rules! half_op {
    ($name:ident, $ty:ty, $f:expr) => {
        /// An `MPI_User_function` over 16-bit words (public for raw-MPI baselines).
        ///
        /// # Safety
        /// MPI's contract for user operations: `invec` and `inout` point to `*len` 16-bit
        /// elements each, `len` is valid.
        pub unsafe extern "C" fn $name(invec: *mut c_void, inout: *mut c_void, len: *mut c_int, _dt: *mut ffi::MPI_Datatype) {
            let n = *len as usize;
            let a = std::slice::from_raw_parts(invec as *const u16, n);
            let b = std::slice::from_raw_parts_mut(inout as *mut u16, n);
            let f: fn(f32, f32) -> f32 = $f;
            for (y, &x) in b.iter_mut().zip(a) {
                let v = f(<$ty>::from_bits(x).to_f32(), <$ty>::from_bits(*y).to_f32());
                *y = <$ty>::from_f32(v).to_bits();
            }
        }
    };
}
half_op!(bf16_sum, half::bf16, |a, b| a + b);
half_op!(bf16_max, half::bf16, |a, b| if a.is_nan() || a > b { a } else { b });
half_op!(bf16_min, half::bf16, |a, b| if a.is_nan() || a < b { a } else { b });
half_op!(f16_sum, half::f16, |a, b| a + b);
half_op!(f16_max, half::f16, |a, b| if a.is_nan() || a > b { a } else { b });
half_op!(f16_min, half::f16, |a, b| if a.is_nan() || a < b { a } else { b });

pub(crate) fn create_user_ops() -> std::result::Result<(), String> {
    if USER_OPS.get().is_some() {
        return Ok(());
    }
    type F = unsafe extern "C" fn(*mut c_void, *mut c_void, *mut c_int, *mut ffi::MPI_Datatype);
    let fns: [F; 6] = [bf16_sum, bf16_max, bf16_min, f16_sum, f16_max, f16_min];
    // SAFETY: MPI_Op is a C handle (a pointer or an int): all-zero is a valid value, and each is
    // overwritten by MPI_Op_create before use.
    let mut ops: [ffi::MPI_Op; 6] = unsafe { std::mem::zeroed() };
    for (op, f) in ops.iter_mut().zip(fns) {
        // SAFETY: called from `MpiComm::world`, after MPI_Init; `f` is an `MPI_User_function`
        // (commutative, hence the 1), `op` a valid out-pointer into `ops`.
        let rc = unsafe { ffi::MPI_Op_create(Some(f), 1, op) };
        if rc != 0 {
            return Err(format!("MPI_Op_create failed: {}", error_string(rc)));
        }
    }
    let _ = USER_OPS.set(UserOps(ops));
    Ok(())
}

pub(super) fn datatype(d: DType) -> ffi::MPI_Datatype {
    // SAFETY: reads of rsmpi's extern statics, C `const` handles (rsmpi.c: `const MPI_Datatype
    // RSMPI_FLOAT = MPI_FLOAT;` ...) that are initialised at load and never written.
    unsafe {
        match d {
            DType::F32 => ffi::RSMPI_FLOAT,
            DType::I64 => ffi::RSMPI_INT64_T,
            DType::Bf16 | DType::F16 => ffi::RSMPI_UINT16_T,
        }
    }
}

pub(super) fn reduction(d: DType, op: ReduceOp) -> ffi::MPI_Op {
    let idx = match op {
        ReduceOp::Sum | ReduceOp::Avg => 0,
        ReduceOp::Max => 1,
        ReduceOp::Min => 2,
    };
    // SAFETY: reads of rsmpi's extern statics, C `const` MPI_Op handles (rsmpi.c) that are
    // initialised at load and never written.
    unsafe {
        match d {
            DType::F32 | DType::I64 => [ffi::RSMPI_SUM, ffi::RSMPI_MAX, ffi::RSMPI_MIN][idx],
            DType::Bf16 => USER_OPS.get().expect("user ops created at init").0[idx],
            DType::F16 => USER_OPS.get().expect("user ops created at init").0[3 + idx],
        }
    }
}

pub(crate) fn error_string(code: c_int) -> String {
    let mut buf = vec![0u8; 1024];
    let mut len: c_int = 0;
    // SAFETY: `buf` holds 1024 bytes, at least MPI_MAX_ERROR_STRING (256 in Open MPI, 1024 in
    // MPICH), which is all MPI_Error_string writes; `len` is a valid out-pointer.
    unsafe {
        if ffi::MPI_Error_string(code, buf.as_mut_ptr() as *mut _, &mut len) != 0 {
            return format!("MPI error {code}");
        }
    }
    buf.truncate(len.max(0) as usize);
    String::from_utf8_lossy(&buf).into_owned()
}

pub(super) fn ok(rc: c_int, ctx: &OpContext, call: &str) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(CommError::Backend { ctx: ctx.clone(), detail: format!("{call} failed: {}", error_string(rc)) })
    }
}

/// `MPI_IN_PLACE` (a macro in mpi.h, so rsmpi's bindings do not have it).
pub fn in_place() -> *mut c_void {
    // SAFETY: csrc/mpi_consts.c: takes nothing and returns the constant MPI_IN_PLACE.
    unsafe { fabbrica_mpi_in_place() }
}
