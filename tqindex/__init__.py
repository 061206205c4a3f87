"""tqindex: TurboQuant vector codec, compressed GPU vector index and KV-cache compression."""

from tqindex.codec import Codes, TurboQuantMSE, TurboQuantProd
from tqindex.index import MAX_NORM, Index

__all__ = ["Codes", "Index", "MAX_NORM", "TurboQuantMSE", "TurboQuantProd"]
__version__ = "0.1.0"
