"""Registers the ``hf3fs`` backend with hicache (entry point group ``hicache``)."""

from hicache_core.hookspecs import BackendRecord, hookimpl


@hookimpl
def hicache_storage_backends():
    yield BackendRecord(
        name="hf3fs",
        target="hicache_plugin_hf3fs.store:Hf3fsStorage",
        interface_v1=True,
        description="3FS: page slots in big preallocated files, keys mapped by a metadata service",
    )
