"""The core's own plugin: registers the in-memory reference backend through the same hook as any plugin."""

from hicache_core.hookspecs import BackendRecord, hookimpl


@hookimpl
def hicache_storage_backends():
    yield BackendRecord(
        name="memory",
        target="hicache_core.storage.memory:MemoryStorage",
        interface_v1=True,
        description="in-process dict of pages; the reference backend (not shared, not persistent)",
    )
