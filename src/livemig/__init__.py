"""livemig — live migration of a process-level toy VM.

Public API (stable names): see the documentation in README.md.
"""
from .errors import LivemigError

__version__ = "0.1.0"
__all__ = ["LivemigError", "__version__"]
