/* MPI_IN_PLACE is a macro in mpi.h (Open MPI: (void *) 1, MPICH: (void *) -1), invisible to rsmpi.
 * The collectives benchmark's raw baseline needs it to make the same in-place MPI_Allreduce call
 * as fabbrica's MPI backend. */
#include <mpi.h>

void *fabbrica_cli_mpi_in_place(void) { return MPI_IN_PLACE; }
