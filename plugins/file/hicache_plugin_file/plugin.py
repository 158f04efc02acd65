"""Registers the ``file`` backend with hicache (entry point group ``hicache``)."""

from hicache_core.hookspecs import BackendRecord, hookimpl


@hookimpl
def hicache_storage_backends():
    yield BackendRecord(
        name="file",
        target="hicache_plugin_file.store:FileStorage",
        interface_v1=True,
        description="one checksummed file per page in a local or shared directory (atomic writes)",
    )
