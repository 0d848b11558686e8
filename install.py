"""A1111 runs this on start-up (unless --skip-install). Everything the extension needs ships with the WebUI
(torch, safetensors, numpy, pillow, gradio, fastapi, pydantic), so there is nothing to install."""
