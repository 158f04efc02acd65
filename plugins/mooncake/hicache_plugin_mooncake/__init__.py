"""hicache-plugin-mooncake: Mooncake Store as the distributed L3 tier (zero copy from the host pool)."""

from hicache_plugin_mooncake.config import MooncakeStoreConfig
from hicache_plugin_mooncake.store import MooncakeStore

__all__ = ["MooncakeStore", "MooncakeStoreConfig"]
