"""tqindex: TurboQuant vector codec, compressed GPU vector index and KV-cache compression."""

from tqindex.codec import Codes, TurboQuantMSE, TurboQuantProd
from tqindex.index import MAX_NORM, Index
from tqindex.ivf import IVFIndex
from tqindex.sharded import ShardedIndex
from tqindex.storage import load_index as load

__all__ = ["Codes", "Index", "IVFIndex", "MAX_NORM", "ShardedIndex", "load", "TurboQuantMSE", "TurboQuantProd"]
__version__ = "0.1.0"
