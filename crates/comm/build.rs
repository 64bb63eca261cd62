#[path = "../../build/torch_cxx.rs"]
mod torch_cxx;
#[path = "../../build/torch_link.rs"]
mod torch_link;

fn main() {
    torch_link::emit();
    println!("cargo:rerun-if-changed=csrc/mpi_consts.c");
    let lib =
        build_probe_mpi::probe().unwrap_or_else(|errs| panic!("no MPI library found (install libopenmpi-dev; scripts/setup.sh does): {errs:?}"));
    let mut cc = cc::Build::new();
    cc.file("csrc/mpi_consts.c");
    for inc in &lib.include_paths {
        cc.include(inc);
    }
    cc.compile("fabbrica_mpi_consts");
    cuda_shim();
}

/// The NCCL backend's stream/event glue (csrc/cuda_shim.cpp), compiled against libtorch's headers.
///
/// It needs libc10 only (CUDA is reached through the implementation libc10_cuda registers; see the
/// file's header). The torch lib directory is also handed to the crate as `FABBRICA_TORCH_LIB`,
/// because the NCCL loader falls back to the wheel's libnccl.so.2 beside it.
fn cuda_shim() {
    println!("cargo:rerun-if-changed=csrc/cuda_shim.cpp");
    let lib = torch_cxx::torch_lib();
    println!("cargo:rustc-env=FABBRICA_TORCH_LIB={}", lib.display());
    torch_cxx::cxx_build().file("csrc/cuda_shim.cpp").compile("fabbrica_cuda_shim");
    println!("cargo:rustc-link-lib=dylib=c10");
}
