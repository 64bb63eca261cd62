#!/usr/bin/env bash
# Packs into DEST what the lent GPU machine's bare image may lack for our binaries (built here on
# Debian 12 against its Open MPI 4.1.4) to load and to run under mpirun on one node:
#
#   DEST/lib/            libraries the binaries (and the MPI runtime) need that are not the MPI
#                        stack: libfreetype and its closure, libudev, libmunge, libz ... Used only
#                        where the image lacks them (see DEST/mpi/env.sh).
#   DEST/mpi/bin/        orterun (+ mpirun, mpiexec -> orterun) and ompi_info
#   DEST/mpi/lib/        the MPI stack: libmpi, libopen-rte, libopen-pal, libmca_common_*, libpmix,
#                        libhwloc, libevent*; always ours (see DEST/mpi/env.sh)
#   DEST/mpi/lib/<pkg>/  the MCA components (Debian: openmpi3) whose libraries we carry: self,
#                        vader (shared memory), tcp, ob1, the collectives, ...; those needing
#                        libfabric, UCX, PSM, verbs or liboshmem are left out
#   DEST/mpi/share/openmpi/, DEST/mpi/etc/   help texts, amca sets, openmpi-mca-params.conf
#   DEST/mpi/pmix/       the external PMIx Debian's Open MPI uses: its components and help texts
#   DEST/mpi/env.sh      source it (bash) on the device; works wherever DEST lies
#
#   scripts/device/pack_mpi.sh DEST [BINARY...]   (default: target/release/fabbrica target/release/comm_selftest)
#
# Idempotent: DEST/lib and DEST/mpi are made afresh; nothing else in DEST is touched.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
[ $# -ge 1 ] || { echo "usage: $0 DEST [BINARY...]" >&2; exit 2; }
DEST="$1"; shift
bins=("$@"); [ ${#bins[@]} -gt 0 ] || bins=(target/release/fabbrica target/release/comm_selftest)
for b in "${bins[@]}"; do [ -x "$b" ] || { echo "error: $b is missing (build it first)" >&2; exit 2; }; done
mkdir -p "$DEST"; DEST="$(cd "$DEST" && pwd)"

# ---- where this machine's Open MPI and PMIx live ------------------------------------------------
command -v ompi_info >/dev/null || { echo "error: ompi_info not found: install openmpi-bin" >&2; exit 2; }
ompi_path() { ompi_info --path "$1" --parsable | sed -n "s/^path:$1://p"; }
ORTERUN="$(readlink -f "$(command -v orterun)")"
OMPI_INFO="$(readlink -f "$(command -v ompi_info)")"
PKGLIBDIR="$(ompi_path pkglibdir)"     # Debian: /usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3
PKGDATADIR="$(ompi_path pkgdatadir)"   # Debian: /usr/share/openmpi
SYSCONFDIR="$(ompi_path sysconfdir)"   # Debian: /etc/openmpi
PKG="$(basename "$PKGLIBDIR")"
[ -d "$PKGLIBDIR" ] && [ -d "$PKGDATADIR" ] || { echo "error: no Open MPI components under $PKGLIBDIR" >&2; exit 2; }
OMPI_VERSION="$(ompi_info --version | sed -n 1p)"   # sed reads it all: no SIGPIPE under pipefail
case "$OMPI_VERSION" in *v4.1.*) ;; *) echo "warning: $OMPI_VERSION: this script was written for Open MPI 4.1" >&2;; esac

# ldd_deps FILE...: "soname<TAB>resolved path" for every library FILE loads (ldd: the closure).
ldd_deps() {
  local f
  for f in "$@"; do
    ldd "$f" | awk '
      $2 == "=>" && $3 == "not" { print $1 "\tNOT-FOUND"; next }
      $2 == "=>" && $3 ~ /^\// { print $1 "\t" $3; next }'
  done | sort -u
}
# What the image has or must provide itself: glibc and the compiler runtime, and everything from
# the torch wheel (libtorch, libc10, CUDA, NCCL; the binaries find those through env.sh's torch lib).
from_image() {  # soname path
  case "$2" in */.venv/*|*/site-packages/*) return 0;; esac
  case "$1" in
    linux-vdso.so*|ld-linux*|libc.so.*|libm.so.*|libmvec.so.*|libpthread.so.*|libdl.so.*|librt.so.*|\
    libutil.so.*|libresolv.so.*|libnsl.so.*|libanl.so.*|libcrypt.so.*|libgcc_s.so.*|libstdc++.so.*|\
    libtorch*|libc10*|libcuda.so*|libnvidia*|libcudart*|libcublas*|libcudnn*|libnccl*|libgomp*) return 0;;
  esac
  return 1
}
# The MPI stack: it must match the carried components and mpirun, so env.sh puts it first.
mpi_stack() {
  case "$1" in
    libmpi.so.*|libmpi_*.so.*|libopen-rte.so.*|libopen-pal.so.*|libmca_common_*|libpmix.so.*|\
    libhwloc.so.*|libevent*.so.*) return 0;;
  esac
  return 1
}

# ---- PMIx (external on Debian: /usr/lib/x86_64-linux-gnu/pmix2) --------------------------------
PMIX_LIB=""; PMIX_ROOT=""
if [ -f "$PKGLIBDIR/mca_pmix_ext3x.so" ]; then
  PMIX_LIB="$(ldd_deps "$PKGLIBDIR/mca_pmix_ext3x.so" | awk -F'\t' '$1 ~ /^libpmix\.so/ {print $2}')"
  [ -n "$PMIX_LIB" ] && [ "$PMIX_LIB" != NOT-FOUND ] || { echo "error: mca_pmix_ext3x.so: libpmix not found" >&2; exit 1; }
  PMIX_ROOT="$(dirname "$(dirname "$(readlink -f "$PMIX_LIB")")")"   # .../pmix2 (lib/, share/)
fi
pmix_comps=(); [ -n "$PMIX_ROOT" ] && [ -d "$PMIX_ROOT/lib/pmix" ] && pmix_comps=("$PMIX_ROOT"/lib/pmix/*.so)

# ---- which MCA components to carry ---------------------------------------------------------------
# The libraries we carry anyway: the binaries', mpirun's and PMIx's closures. A component is kept
# when all it needs is among those, the image's, or the MPI stack (libmca_common_* among them).
roots=("${bins[@]}" "$ORTERUN" "$OMPI_INFO"); [ -n "$PMIX_LIB" ] && roots+=("$PMIX_LIB" "${pmix_comps[@]}")
declare -A base=()
while IFS=$'\t' read -r so path; do base[$so]=1; done < <(ldd_deps "${roots[@]}")
comps=(); dropped=()
for c in "$PKGLIBDIR"/*.so; do
  n="$(basename "$c")"
  # Interconnects the device has no libraries (or hardware) for, and OpenSHMEM.
  case "$n" in *ofi*|*ucx*|*psm*|*openib*|*verbs*|*usnic*|*portals*|*cuda*|*hcoll*|*knem*|*xpmem*)
    dropped+=("$n (interconnect)"); continue;; esac
  why=""
  while IFS=$'\t' read -r so path; do
    [ "$path" = NOT-FOUND ] && { why+=" $so(not found)"; continue; }
    from_image "$so" "$path" || mpi_stack "$so" || [ -n "${base[$so]:-}" ] || why+=" $so"
  done < <(ldd_deps "$c")
  if [ -n "$why" ]; then dropped+=("$n (needs$why)"); else comps+=("$c"); fi
done

# ---- copy ---------------------------------------------------------------------------------------
rm -rf "$DEST/lib" "$DEST/mpi"
M="$DEST/mpi"
mkdir -p "$DEST/lib" "$M/bin" "$M/lib/$PKG" "$M/share" "$M/etc"
install -m 0755 "$ORTERUN" "$M/bin/orterun"
install -m 0755 "$OMPI_INFO" "$M/bin/ompi_info"
ln -s orterun "$M/bin/mpirun"; ln -s orterun "$M/bin/mpiexec"
for c in "${comps[@]}"; do install -m 0644 "$c" "$M/lib/$PKG/"; done
cp -rL "$PKGDATADIR" "$M/share/openmpi"
rm -rf "$M/share/openmpi"/*-wrapper-data.txt "$M/share/openmpi/openmpi-valgrind.supp"
for f in "$SYSCONFDIR"/openmpi-mca-params.conf "$SYSCONFDIR"/openmpi-default-hostfile; do
  [ -f "$f" ] && install -m 0644 "$f" "$M/etc/"
done
if [ -n "$PMIX_ROOT" ]; then
  mkdir -p "$M/pmix/lib/pmix" "$M/pmix/share/pmix" "$M/pmix/etc"
  for c in "${pmix_comps[@]}"; do install -m 0644 "$c" "$M/pmix/lib/pmix/"; done
  cp "$PMIX_ROOT"/share/pmix/help-*.txt "$M/pmix/share/pmix/"
  # Debian's pmix-mca-params.conf only names its component path, which env.sh sets instead.
  echo "# PMIx MCA parameters (the component path is set by ../../env.sh)" > "$M/pmix/etc/pmix-mca-params.conf"
fi
# Every library that the binaries, mpirun and the kept components load, but the image's own.
files=("${roots[@]}" "$M/lib/$PKG"/*.so); [ -n "$PMIX_ROOT" ] && files+=("$M/pmix/lib/pmix"/*.so)
n_mpi=0; n_lib=0
while IFS=$'\t' read -r so path; do
  [ "$path" = NOT-FOUND ] && { from_image "$so" "" && continue; echo "error: $so: not found here" >&2; exit 1; }
  from_image "$so" "$path" && continue
  if mpi_stack "$so"; then install -m 0644 "$(readlink -f "$path")" "$M/lib/$so"; n_mpi=$((n_mpi + 1))
  else install -m 0644 "$(readlink -f "$path")" "$DEST/lib/$so"; n_lib=$((n_lib + 1)); fi
done < <(ldd_deps "${files[@]}")
[ -f "$M/lib/libmpi.so.40" ] || { echo "error: libmpi.so.40 was not packed" >&2; exit 1; }

# ---- env.sh -------------------------------------------------------------------------------------
{
cat <<'EOF'
# Source this (bash) on the lent GPU machine before running the binaries or mpirun:
#   source .device/mpi/env.sh
# It runs our binaries (built on Debian 12 against Open MPI 4.1.4) with the Open MPI 4.1.4 +
# PMIx 4.2 runtime carried beside it, wherever this folder lies. Written by scripts/device/pack_mpi.sh.
#
# Why always our MPI, even where the image has an mpirun: the binaries link libmpi.so.40, a soname
# Open MPI 4.0, 4.1 and 5.0 all use; libmpi, its components, the PMIx library and mpirun must be
# one build (the components use libopen-pal's internals, and the app's ORTE/PMIx client talks to
# mpirun's server). So the MPI stack (mpi/lib) goes FIRST in LD_LIBRARY_PATH, and mpi/bin first in
# PATH: the image's libmpi (say Ubuntu's 4.1.6 or an HPC-X 5.x) cannot mix in. OPAL_* and PMIX_*
# relocate both installs (they have no absolute paths then), and the component paths are set
# outright, so no component of the image's MPI is picked up. Set FABBRICA_MPI=system beforehand to
# leave the image's MPI alone (then only the missing generic libraries below are added).
#
# The other carried libraries (../lib: libfreetype, libpng16, libbrotli*, libz, libudev, libmunge)
# should come from the image where it has them. Appending ../lib to LD_LIBRARY_PATH would not do
# that: the loader searches every LD_LIBRARY_PATH entry before the system's own directories. So
# only the ones the image's loader cache (ldconfig -p) lacks are linked into a temporary folder,
# which is appended.
_fab_mpi="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_fab_dest="$(dirname "$_fab_mpi")"
_fab_prepend() { case ":${!1:-}:" in *":$2:"*) ;; *) export "$1=$2${!1:+:${!1}}";; esac; }
_fab_append() { case ":${!1:-}:" in *":$2:"*) ;; *) export "$1=${!1:+${!1}:}$2";; esac; }

# Generic libraries: only those the image lacks (or has as an empty file).
_fab_ldc="$(ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true)"
_fab_missing=()
for _f in "$_fab_dest"/lib/*.so*; do
  [ -e "$_f" ] || continue
  # (no pipe, and awk reads to the end: safe in a caller's set -eo pipefail)
  _p="$(awk -v n="${_f##*/}" '$1 == n && /x86-64/ && !p { p = $NF } END { print p }' <<< "$_fab_ldc")"
  { [ -n "$_p" ] && [ -s "$_p" ]; } || _fab_missing+=("$_f")
done
if [ ${#_fab_missing[@]} -gt 0 ]; then
  if [ -z "$_fab_ldc" ]; then _fab_append LD_LIBRARY_PATH "$_fab_dest/lib"  # no ldconfig: all of them
  elif _fab_farm="$(mktemp -d "${TMPDIR:-/tmp}/fabbrica-lib.XXXXXX")"; then
    ln -s "${_fab_missing[@]}" "$_fab_farm/"
    _fab_append LD_LIBRARY_PATH "$_fab_farm"
  else _fab_append LD_LIBRARY_PATH "$_fab_dest/lib"; fi
fi

if [ "${FABBRICA_MPI:-carried}" != system ]; then
  # Open MPI's installdirs: OPAL_PREFIX alone would give Debian's layout under it
  # (lib/x86_64-linux-gnu/openmpi/lib/...), so every directory is named; sysconfdir (/etc/openmpi
  # on Debian) is absolute in the build and needs its own variable.
  export OPAL_PREFIX="$_fab_mpi" OPAL_EXEC_PREFIX="$_fab_mpi" OPAL_BINDIR="$_fab_mpi/bin" \
    OPAL_LIBDIR="$_fab_mpi/lib" OPAL_DATAROOTDIR="$_fab_mpi/share" OPAL_DATADIR="$_fab_mpi/share" \
    OPAL_PKGDATADIR="$_fab_mpi/share/openmpi" OPAL_SYSCONFDIR="$_fab_mpi/etc"
EOF
echo "  export OPAL_PKGLIBDIR=\"\$_fab_mpi/lib/$PKG\" OMPI_MCA_mca_base_component_path=\"\$_fab_mpi/lib/$PKG\""
cat <<'EOF'
  # PMIx (Debian's is external, configured with absolute libdir and datadir): the same for it.
  export PMIX_PREFIX="$_fab_mpi/pmix" PMIX_EXEC_PREFIX="$_fab_mpi/pmix" PMIX_LIBDIR="$_fab_mpi/pmix/lib" \
    PMIX_DATAROOTDIR="$_fab_mpi/pmix/share" PMIX_DATADIR="$_fab_mpi/pmix/share" \
    PMIX_PKGDATADIR="$_fab_mpi/pmix/share/pmix" PMIX_PKGLIBDIR="$_fab_mpi/pmix/lib/pmix" \
    PMIX_SYSCONFDIR="$_fab_mpi/pmix/etc" PMIX_MCA_mca_base_component_path="$_fab_mpi/pmix/lib/pmix"
  unset PMIX_INSTALL_PREFIX
  # hwloc 2.9's plugins (PCI, GL, ...) are not carried; keep it from loading an image's newer ones.
  export HWLOC_PLUGINS_PATH="$_fab_mpi/lib/hwloc-plugins-none"
  # Only these transports are carried; an image may preset others (NGC sets OMPI_MCA_pml=ucx).
  export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader,tcp
  _fab_prepend PATH "$_fab_mpi/bin"
  _fab_prepend LD_LIBRARY_PATH "$_fab_mpi/lib"
fi
unset _fab_mpi _fab_dest _fab_ldc _fab_missing _fab_farm _f _p
unset -f _fab_prepend _fab_append
EOF
} > "$M/env.sh"

# ---- report -------------------------------------------------------------------------------------
echo "pack_mpi: $n_mpi MPI-stack libraries in $M/lib, $n_lib others in $DEST/lib: $(cd "$DEST/lib" && echo *)"
echo "pack_mpi: ${#comps[@]} MCA components in $M/lib/$PKG, ${#dropped[@]} left out:"
printf '  %s\n' "${dropped[@]}"
[ -n "$PMIX_ROOT" ] && echo "pack_mpi: PMIx from $PMIX_ROOT: ${#pmix_comps[@]} components"
glibc_max="$(find "$DEST/lib" "$M" -type f \( -name '*.so*' -o -path '*/bin/*' \) -exec objdump -T {} + 2>/dev/null |
  grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 || true)"  # a report only: never fails the pack
echo "pack_mpi: newest glibc symbol version the carried files need: $glibc_max"
du -sh "$DEST/lib" "$M" | sed 's/^/pack_mpi: /'
echo "pack_mpi: total $(du -shc "$DEST/lib" "$M" | tail -1 | cut -f1)"
