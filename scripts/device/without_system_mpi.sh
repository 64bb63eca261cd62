#!/usr/bin/env bash
# Runs a command as on a bare GPU image: in a private mount namespace (root, `unshare -m`) where
# this machine's Open MPI, PMIx, hwloc, libevent and freetype stacks are hidden (empty folders and
# empty files bind-mounted over them), so only what a pack carries (scripts/device/pack_mpi.sh)
# can be loaded. Nothing outside the namespace changes.
#
#   scripts/device/without_system_mpi.sh bash -c 'source .device/mpi/env.sh && mpirun -np 2 ...'
#
# Exits 3 (and says why) where a mount namespace cannot be made (not root, no unshare).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
if [ -z "${FABBRICA_IN_NAMESPACE:-}" ]; then
  command -v unshare >/dev/null || { echo "cannot hide the system MPI: no unshare" >&2; exit 3; }
  [ "$(id -u)" = 0 ] || { echo "cannot hide the system MPI: needs root (bind mounts)" >&2; exit 3; }
  unshare -m true 2>/dev/null || { echo "cannot hide the system MPI: unshare -m is not permitted here" >&2; exit 3; }
  FABBRICA_IN_NAMESPACE=1 exec unshare -m --propagation private "$0" "$@"
fi
L=/usr/lib/x86_64-linux-gnu
empty="$(mktemp -d)"; mkdir -p "$empty/dir"; : > "$empty/file"
for d in $L/openmpi $L/pmix2 $L/hwloc /usr/share/openmpi /etc/openmpi; do
  [ -d "$d" ] && mount --bind "$empty/dir" "$d"
done
for f in /usr/bin/mpirun /usr/bin/orterun /usr/bin/mpiexec /usr/bin/ompi_info \
         $(ls $L | grep -E '^lib(mpi|mpi_[a-z_]*|open-rte|open-pal|pmix|hwloc|event[a-z_]*-2\.1|freetype|mca_common_[a-z]*|munge|png16|brotli[a-z]*|udev)\.so' | sed "s|^|$L/|"); do
  t=$(readlink -f "$f"); [ -f "$t" ] || continue
  mountpoint -q "$t" 2>/dev/null && continue
  mount --bind "$empty/file" "$t"
done
exec "$@"
