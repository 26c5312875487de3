"""One adapter per vision-language family, found by `model_type` (see `base.Family`).

Adding a family is adding one module here: every module of this package is imported, and its
`@register`ed class serves its model types.
"""

import importlib
import pkgutil

from mdpo_fast.families.base import Family, family_for, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Family", "family_for", "register"]
