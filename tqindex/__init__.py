"""tqindex: TurboQuant vector codec, compressed GPU vector index and KV-cache compression."""

from tqindex.codec import Codes, TurboQuantMSE, TurboQuantProd

__all__ = ["Codes", "TurboQuantMSE", "TurboQuantProd"]
__version__ = "0.1.0"
