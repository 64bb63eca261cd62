#[path = "../../build/torch_link.rs"]
mod torch_link;

fn main() {
    torch_link::emit();
    // MPI_IN_PLACE for the raw baseline of `fabbrica bench collectives`.
    println!("cargo:rerun-if-changed=csrc/mpi_in_place.c");
    let lib = build_probe_mpi::probe().unwrap_or_else(|errs| {
        panic!("no MPI library found (install libopenmpi-dev; scripts/setup.sh does): {errs:?}")
    });
    let mut cc = cc::Build::new();
    cc.file("csrc/mpi_in_place.c");
    for inc in &lib.include_paths {
        cc.include(inc);
    }
    cc.compile("fabbrica_cli_mpi");
}
