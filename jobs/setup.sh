#!/usr/bin/env bash
# Set up mpips on a fresh Debian 12 / Ubuntu machine, or on a cluster with its own MPI and HDF5.
#
#   bash jobs/setup.sh            # MPI + parallel HDF5 from apt if missing, then .venv
#
# Idempotent: a second run checks what is there and finishes in seconds.
#
# Using the cluster's own MPI and HDF5 instead of the distribution's:
#   module load openmpi hdf5/parallel          # or: cray-mpich cray-hdf5-parallel, ...
#   MPICC=$(which mpicc) HDF5_DIR=$HDF5_ROOT bash jobs/setup.sh
# With MPICC set or an mpicc on PATH, no MPI is installed; with HDF5_DIR set (or a parallel
# hdf5 found by pkg-config) no HDF5 is installed. mpi4py is then compiled against that MPI.
#
# Environment knobs:
#   VENV=path            virtual environment to create or reuse (default: .venv in the repo)
#   PYTHON=python3       interpreter to build the venv from
#   MPIPS_MPI=openmpi    which distribution MPI to install when none is found (openmpi|mpich)
#   MPIPS_MPI4PY_SOURCE=1  compile mpi4py from source even for Open MPI
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$here/.venv}
PYTHON=${PYTHON:-python3}
MPIPS_MPI=${MPIPS_MPI:-openmpi}
say() { printf '[setup] %s\n' "$*"; }

sudo_if_needed() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    say "apt-get install $*"
    export DEBIAN_FRONTEND=noninteractive
    sudo_if_needed apt-get update -qq
    sudo_if_needed apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- 1. system packages: compilers, MPI, parallel HDF5 -----------------------------------------
need=()
command -v gcc >/dev/null || need+=(gcc)
command -v pkg-config >/dev/null || need+=(pkg-config)
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then need+=(python3-venv python3-dev); fi
# h5py is compiled below: it needs Python.h even where venv and ensurepip are already there.
if ! "$PYTHON" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null
then need+=(python3-dev); fi

MPICC=${MPICC:-$(command -v mpicc || true)}
if [ -z "$MPICC" ]; then
    case "$MPIPS_MPI" in
        openmpi) need+=(openmpi-bin libopenmpi-dev) ;;
        mpich) need+=(mpich libmpich-dev) ;;
        *) echo "MPIPS_MPI must be openmpi or mpich, not '$MPIPS_MPI'" >&2; exit 2 ;;
    esac
fi

# The parallel HDF5 must be built for the same MPI as mpi4py: Debian names it hdf5-<flavour>.
flavour=$MPIPS_MPI
if [ -n "$MPICC" ]; then
    if "$MPICC" -showme:version >/dev/null 2>&1; then flavour=openmpi; else flavour=mpich; fi
fi
hdf5_pc=""
if [ -z "${HDF5_DIR:-}" ]; then
    hdf5_pc="hdf5-$flavour"
    pkg-config --exists "$hdf5_pc" 2>/dev/null || need+=("libhdf5-$flavour-dev")
fi

if [ ${#need[@]} -gt 0 ]; then
    apt_install "${need[@]}"
else
    say "system packages present (MPI compiler: $MPICC)"
fi
MPICC=${MPICC:-$(command -v mpicc)}
mpi_kind=mpich
if "$MPICC" -showme:version >/dev/null 2>&1; then mpi_kind=openmpi; fi
say "MPI: $mpi_kind ($MPICC); parallel HDF5: ${HDF5_DIR:-pkg-config $hdf5_pc}"

# --- 2. virtual environment ------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
# (drop pip's warnings about index locations that a machine's pip.conf names but lacks)
pip() {
    "$py" -m pip --disable-pip-version-check -q "$@" \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
have() { "$py" -c "$1" >/dev/null 2>&1; }
# pip caches a wheel it compiled by the sdist's name alone, not by the MPI and HDF5 it was linked
# against: another venv for another MPI would get this one's h5py or mpi4py (linked to the wrong
# libmpi). So the source builds below keep a wheel cache of their own per MPI compiler and HDF5.
built_cache=$("$py" -m pip cache dir 2>/dev/null || true)
if [ -n "$built_cache" ]; then
    built_cache=--cache-dir="$built_cache/mpips-$(printf '%s\n' "$(readlink -f "$MPICC")" \
        "${HDF5_DIR:-$hdf5_pc}" | cksum | cut -d' ' -f1)"
else
    built_cache=--no-cache-dir
fi

# --- 3. torch (CPU wheel here; keep the pin so pip never pulls a CUDA build by accident) --------
if have 'import torch'; then
    say "torch $("$py" -c 'import torch; print(torch.__version__)') present"
else
    say "installing torch==2.13.0"
    pip install torch==2.13.0
fi

# --- 4. mpi4py built for this MPI -------------------------------------------------------------
if have 'from mpi4py import MPI'; then
    say "mpi4py present ($("$py" -c 'from mpi4py import MPI; print(MPI.Get_library_version().strip("\0").splitlines()[0])'))"
elif [ "$mpi_kind" = openmpi ] && [ -z "${MPIPS_MPI4PY_SOURCE:-}" ]; then
    say "installing mpi4py (binary wheel; it loads this Open MPI at run time)"
    pip install 'mpi4py>=4.0'
    have 'from mpi4py import MPI' || { say "binary mpi4py failed to load; compiling"; \
        MPICC="$MPICC" pip install "$built_cache" --force-reinstall --no-binary=mpi4py 'mpi4py>=4.0'; }
else
    say "compiling mpi4py against $MPICC (a few minutes the first time, cached after)"
    MPICC="$MPICC" pip install "$built_cache" --no-binary=mpi4py 'mpi4py>=4.0'
fi

# --- 5. h5py with MPI-IO, built from source without build isolation --------------------------
# Isolation would compile a pinned mpi4py from source in a throw-away env (21+ GB RAM, 20+ min).
if have 'import h5py, sys; sys.exit(not h5py.get_config().mpi)'; then
    say "h5py $("$py" -c 'import h5py; print(h5py.__version__)') with MPI-IO present"
else
    say "building h5py with MPI-IO (a few minutes the first time, cached after)"
    pip install numpy 'Cython>=3,<4' pkgconfig 'setuptools>=77.0.1' packaging wheel
    if [ -n "${HDF5_DIR:-}" ]; then
        CC="$MPICC" HDF5_MPI=ON HDF5_DIR="$HDF5_DIR" \
            pip install "$built_cache" --force-reinstall --no-deps --no-build-isolation --no-binary=h5py h5py
    else
        CC="$MPICC" HDF5_MPI=ON HDF5_PKGCONFIG_NAME="$hdf5_pc" \
            pip install "$built_cache" --force-reinstall --no-deps --no-build-isolation --no-binary=h5py h5py
    fi
    have 'import h5py, sys; sys.exit(not h5py.get_config().mpi)' \
        || { echo "h5py was built but has no MPI-IO" >&2; exit 1; }
fi

# --- 6. mpips itself, editable, with the test and documentation tools ------------------------
say "installing mpips (editable, [test,dev,docs])"
pip install -e "${here}[test,dev,docs]"
say "done: $("$py" -c 'import torch, h5py, mpi4py, numpy; print(f"torch {torch.__version__}, h5py {h5py.__version__} (mpi={h5py.get_config().mpi}), mpi4py {mpi4py.__version__}, numpy {numpy.__version__}")')"
say "before mpirun or python in a shell: source ${here}/jobs/env.sh (the .venv, and Open MPI's settings for root and for more ranks than cores)"
