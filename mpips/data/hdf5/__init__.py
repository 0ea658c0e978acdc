"""The mpips HDF5 dataset format: partitioned training samples, a held-out split, checksums.

Layout of a file (``schema = "mpips.dataset"``, ``version = 1``)::

    /            attrs: schema, version, name, kind, num_classes
                 kind: "classification" | "regression" | "multilabel" | "tokens" | "text"
    /train/x     (N, *shape) inputs       } one row per sample; y: classification (N,) int64 labels,
    /train/y     (N, *target) targets     } regression float32, multilabel 0/1 (N, C), tokens
                                            (N, T) next-token ids for x (N, T) ids
    /train/tokens (N, L + 1) uint8        text: byte windows; x = w[:-1], y = w[1:] (next byte)
    /train       attrs: partition_offsets, partition_sizes (int64[P]),
                        partition_crc32 (int64[P, fields]: zlib.crc32 of each field's rows)
    /val/...     the held-out split, same fields, not partitioned

Partitions are contiguous row ranges of /train; they are the unit of placement on data servers
and of reading (see ``EpochPlan``). Datasets are chunked (a chunk never straddles two
partitions' worth of rows by much) and optionally compressed.

Reading goes through ``PartitionReader``: a request for sample ids is served from whole
partitions read in one contiguous slab into an LRU cache bounded in bytes; a partition bigger
than the bound is read as the smallest contiguous span covering the request instead.

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
