#[path = "../../build/torch_link.rs"]
mod torch_link;

use std::path::PathBuf;

fn main() {
    torch_link::emit();
    println!("cargo:rerun-if-changed=csrc/mpi_consts.c");
    let lib = build_probe_mpi::probe().unwrap_or_else(|errs| {
        panic!("no MPI library found (install libopenmpi-dev; scripts/setup.sh does): {errs:?}")
    });
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
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB"),
    );
    println!("cargo:rustc-env=FABBRICA_TORCH_LIB={}", lib.display());
    // torch/lib -> torch/include (pip wheel layout; also the layout of an unpacked libtorch zip).
    let include = lib.parent().expect("libtorch lib dir has a parent").join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .include(&include)
        .file("csrc/cuda_shim.cpp")
        .compile("fabbrica_cuda_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=c10");
}
