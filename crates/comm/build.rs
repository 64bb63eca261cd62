#[path = "../../build/torch_link.rs"]
mod torch_link;

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
}
