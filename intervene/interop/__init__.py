"""Interoperability with other tools' formats (imported explicitly, each in its own module):

* :mod:`intervene.interop.pyvene` — pyvene intervention directories (``import_pyvene`` / ``export_pyvene``);
* :mod:`intervene.interop.gguf` — llama.cpp control vectors (``export_control_vector`` / ``import_control_vector``).
"""
