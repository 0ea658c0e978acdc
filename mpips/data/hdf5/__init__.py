"""The mpips HDF5 dataset format: partitioned training samples, a held-out split, checksums.

The layout of a file (fields, partitions, checksums) is described in ``mpips.data.hdf5.schema``.

Modules: ``schema`` (the format: ``SampleFormat``, ``Partitions``), ``file`` (``DatasetFile``),
``reading`` (``PartitionReader``, ``HDF5Store``, ``HeldOut``), ``writer`` (``DatasetWriter``).
"""

from mpips.data.hdf5.file import DatasetFile
from mpips.data.hdf5.reading import HDF5Store, HeldOut, PartitionReader
from mpips.data.hdf5.schema import (
    SCHEMA,
    VERSION,
    DatasetError,
    Field,
    Partitions,
    SampleFormat,
    describe_nonfinite,
    first_nonfinite,
    iter_slabs,
)
from mpips.data.hdf5.writer import DatasetWriter

__all__ = [
    "SCHEMA",
    "VERSION",
    "DatasetError",
    "DatasetFile",
    "DatasetWriter",
    "Field",
    "HDF5Store",
    "HeldOut",
    "PartitionReader",
    "Partitions",
    "SampleFormat",
    "describe_nonfinite",
    "first_nonfinite",
    "iter_slabs",
]
