#[path = "../../build/torch_cxx.rs"]
mod torch_cxx;
#[path = "../../build/torch_link.rs"]
mod torch_link;

fn main() {
    torch_link::emit();
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-changed=csrc/amp.cpp");
    println!("cargo:rerun-if-changed=csrc/hooks.cpp");
    println!("cargo:rerun-if-changed=csrc/recompute.cpp");
    println!("cargo:rerun-if-changed=csrc/function.cpp");
    torch_cxx::cxx_build()
        .file("csrc/shim.cpp")
        .file("csrc/amp.cpp")
        .file("csrc/hooks.cpp")
        .file("csrc/recompute.cpp")
        .file("csrc/function.cpp")
        .compile("fabbrica_torch_ext");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
