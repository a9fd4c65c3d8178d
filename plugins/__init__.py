"""Delta bundles and delta kinds (the contract between tuning and serving).

Importing this package installs the torchvision CPU shim in the current process
(see :mod:`deltaserve.plugins.compat`); keep this module free of heavy imports.
"""

from deltaserve.plugins import compat as _compat

_compat.install_import_hook()
