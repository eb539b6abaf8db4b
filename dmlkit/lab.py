"""JupyterLab as ``make lab`` runs it: ``python -m dmlkit.lab [jupyter lab options]``.

The server listens on 127.0.0.1 only, new notebooks get the ``dmlkit`` kernel, and every
kernel starts in the server's root folder (the repository for ``make lab``) instead of
beside its notebook. The notebooks' paths (``papermill_runs/...``, ``figures``) are relative
to the repository root, the working directory that papermill (``--cwd .``) and the sweeps
give them; a kernel started in ``notebooks/`` would write a second ``papermill_runs/``
there and not find the sweeps. An option given on the command line replaces the default
for the same setting (``--ip=0.0.0.0`` to listen on every interface).
"""

from __future__ import annotations

import os
import sys

from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager

# setting → (the spellings of its command-line option, default value)
DEFAULTS: dict[str, tuple[tuple[str, ...], str]] = {
    "ServerApp.ip": (("ip", "ServerApp.ip"), "127.0.0.1"),
    "ServerApp.contents_manager_class": (
        ("ServerApp.contents_manager_class",),
        "dmlkit.lab.RootKernelContentsManager",
    ),
    "MappingKernelManager.default_kernel_name": (
        ("MappingKernelManager.default_kernel_name",),
        "dmlkit",
    ),
}
# Containers and CI run as root, which Jupyter refuses unless told; the server listens on
# loopback only and asks for its token, so nothing is opened to the network.
if os.name == "posix" and os.geteuid() == 0:
    DEFAULTS["ServerApp.allow_root"] = (("allow-root", "ServerApp.allow_root"), "True")


class RootKernelContentsManager(AsyncLargeFileManager):
    """Jupyter's default contents manager, but kernels start in the server's root folder."""

    async def get_kernel_path(self, path: str, model: dict | None = None) -> str:
        return ""  # the API path of the root folder


def lab_arguments(args: list[str]) -> list[str]:
    """``args`` after the defaults of every setting that ``args`` does not set itself."""
    given = {arg.lstrip("-").split("=", 1)[0] for arg in args if arg.startswith("--")}
    defaults = [
        f"--{setting}={value}"
        for setting, (spellings, value) in DEFAULTS.items()
        if not given.intersection(spellings)
    ]
    return [*defaults, *args]


def main(argv: list[str] | None = None) -> None:
    from jupyterlab.labapp import LabApp

    LabApp.launch_instance(argv=lab_arguments(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
