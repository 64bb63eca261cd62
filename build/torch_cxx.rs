// Shared by the build scripts that compile a C++ shim against libtorch's own headers
// (`#[path]`-included next to torch_link.rs; needs the `cc` build-dependency).

use std::path::PathBuf;

/// torch/lib, as torch-sys exports it.
pub fn torch_lib() -> PathBuf {
    PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB"))
}

/// A `cc` build for C++17 with libtorch's ABI and include directory (torch/lib -> torch/include:
/// the pip wheel layout, also that of an unpacked libtorch zip), plus the link search path.
pub fn cxx_build() -> cc::Build {
    let lib = torch_lib();
    let include = lib.parent().expect("libtorch lib dir has a parent").join("include");
    println!("cargo:rustc-link-search=native={}", lib.display());
    let mut b = cc::Build::new();
    b.cpp(true)
        .pic(true)
        .std("c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .include(&include)
        .include(include.join("torch/csrc/api/include"));
    b
}
