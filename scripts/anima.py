"""A1111 entry point: registers the extension and exposes its AlwaysOn script. Nothing else lives here."""

import os
import sys

# The host puts an extension's folder on sys.path only while loading its scripts; lazy imports need it later too.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from lib_anima.webui import entry  # noqa: E402
from lib_anima.webui.script import AnimaScript  # noqa: E402,F401 - the host finds Script subclasses here

entry.register()
