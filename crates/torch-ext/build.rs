#[path = "../../build/torch_link.rs"]
mod torch_link;

use std::path::PathBuf;

fn main() {
    torch_link::emit();
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-changed=csrc/hooks.cpp");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap());
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
        .include(include.join("torch/csrc/api/include"))
        .file("csrc/shim.cpp")
        .file("csrc/hooks.cpp")
        .compile("fabbrica_torch_ext");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
