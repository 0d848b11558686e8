"""sd-webui-anima core: reference contexts, their files, the attention injection and training.

Everything in this package except :mod:`lib_anima.webui` imports without the WebUI
(torch, safetensors, numpy and pillow only).
"""

__version__ = "0.1.0"
