"""hicache-plugin-file: the default L3 tier -- one checksummed file per page in a local or shared directory."""

from hicache_plugin_file.store import FileStorage

__all__ = ["FileStorage"]
