"""mulayer's version (``mulayer.__version__``), in a module of its own so that the compiler can
stamp it into artifacts without importing the package's public facade."""

__version__ = "0.1.0"
