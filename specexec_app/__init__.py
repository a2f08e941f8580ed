"""specexec-app: exact SpecExec speculative decoding for offloaded large language models."""

__version__ = "0.1.0"
