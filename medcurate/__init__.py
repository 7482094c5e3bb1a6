"""medcurate: confounder-aware curation of medical image archives on Ray."""

__version__ = "0.1.0"
