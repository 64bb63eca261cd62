// Shared by the build scripts of every crate whose targets link libtorch (`#[path]`-included).
//
// Two facts measured on these machines make this necessary:
// - rustc passes `--as-needed`, so `libtorch_cuda.so` (which no Rust symbol references) is dropped
//   from the binary's NEEDED list and libtorch then reports no CUDA device. We keep it explicitly.
// - torch-sys sets no rpath. The binaries get one to the venv's `torch/lib` (libtorch itself carries
//   `$ORIGIN` rpaths to the nvidia-* wheels), so nobody has to set LD_LIBRARY_PATH by hand.

pub fn emit() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not export DEP_TCH_LIBTORCH_LIB: add torch-sys as a dependency");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-ltorch,--as-needed");
    }
}
