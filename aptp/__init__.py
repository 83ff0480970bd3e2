"""aptp: Adaptive Prompt-Tailored Pruning of text-to-image diffusion models.

The core engine (``aptp.engine``) imports without the CLI; the ``aptp`` command lives in
``aptp.cli``.
"""

__version__ = "0.1.0"
