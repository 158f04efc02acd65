"""Registers the ``mooncake`` backend with hicache (entry point group ``hicache``)."""

from hicache_core.hookspecs import BackendRecord, hookimpl


@hookimpl
def hicache_storage_backends():
    yield BackendRecord(
        name="mooncake",
        target="hicache_plugin_mooncake.store:MooncakeStore",
        interface_v1=True,
        page_first_only=True,
        description="Mooncake Store (distributed memory pool), zero copy from page-first host layouts",
        install_hint="pip install 'hicache-plugin-mooncake[cuda]' (or [cpu] on a machine without a GPU)",
        requires=("mooncake.store",),
    )
