/* Values that are macros in mpi.h and so invisible to bindgen/rsmpi. */
#include <mpi.h>
#if defined(OPEN_MPI) && OPEN_MPI
#include <mpi-ext.h>
#endif

void *fabbrica_mpi_in_place(void) { return MPI_IN_PLACE; }

/* 1 when the MPI library says it can take CUDA device pointers, 0 when it says it cannot or cannot
 * tell. Open MPI answers through MPIX_Query_cuda_support (run-time, after MPI_Init). */
int fabbrica_mpi_cuda_aware(void) {
#if defined(MPIX_CUDA_AWARE_SUPPORT) && MPIX_CUDA_AWARE_SUPPORT
    return MPIX_Query_cuda_support();
#else
    return 0;
#endif
}
