"""dmlkit: deep metric learning with density adaptivity.

Submodules are imported on use (``dmlkit.data``, ``dmlkit.losses``, ...) so that
``import dmlkit`` stays cheap for the sweep runner and the notebooks.
"""

__version__ = "0.1.0"
