"""hicache-plugin-hf3fs: the 3FS tier -- per-rank preallocated files with page slots, and a metadata service
(in process, or an HTTP server shared by several instances) mapping keys to slots."""

from hicache_plugin_hf3fs.config import Hf3fsConfig
from hicache_plugin_hf3fs.metadata import HttpMetadataClient, LocalMetadataClient, RankMetadata
from hicache_plugin_hf3fs.store import Hf3fsStorage

__all__ = ["Hf3fsConfig", "Hf3fsStorage", "HttpMetadataClient", "LocalMetadataClient", "RankMetadata"]
