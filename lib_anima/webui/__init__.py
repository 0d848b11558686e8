"""Host glue: the only part of the extension that imports the WebUI's ``modules``."""
